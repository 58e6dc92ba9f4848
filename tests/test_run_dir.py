"""utils/run_dir.py: the run directory's names, atomic_write, the careful text reader, metrics.jsonl and
test_metrics.json."""
import json
import os
import re
import subprocess
import sys

import pytest

from utils import run_dir as rd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_imports_no_torch():
    code = "import sys, utils.run_dir; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


def test_file_names_are_spelled_out_once():
    """Every run-directory file name appears as a string literal only in utils/run_dir.py among the product
    modules (docstrings and comments may mention them)."""
    import ast
    names = {rd.CONFIG_FILE, rd.METRICS_FILE, rd.TEST_METRICS_FILE, rd.BEST_CHECKPOINT, rd.LAST_CHECKPOINT,
             rd.LOG_FILE, rd.TEST_LOG_FILE, rd.GALLERY_CACHE_DIR}
    found = []
    for folder, _, files in os.walk(REPO):
        rel = os.path.relpath(folder, REPO)
        if rel.split(os.sep)[0] in ("tests", ".git") or "/." in folder:
            continue
        for f in files:
            if not f.endswith(".py") or (rel == "utils" and f == "run_dir.py"):
                continue
            tree = ast.parse(open(os.path.join(folder, f), encoding="utf-8").read())
            docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                          if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                          and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and node.value in names and id(node) not in docstrings:
                    found.append(f"{os.path.join(rel, f)}:{node.lineno}: {node.value}")
    assert found == []


def test_resolve_run(tmp_path):
    (tmp_path / "configs.yaml").write_text("a: 1\n")
    (tmp_path / "last.pth").write_bytes(b"x")
    assert rd.resolve_run(tmp_path) == (str(tmp_path), str(tmp_path / "configs.yaml"))
    assert rd.resolve_run(str(tmp_path / "configs.yaml")) == (str(tmp_path), str(tmp_path / "configs.yaml"))
    assert rd.resolve_run(tmp_path, rd.LAST_CHECKPOINT) == (str(tmp_path), str(tmp_path / "last.pth"))
    with pytest.raises(FileNotFoundError, match=r"no such checkpoint \(expected a run directory .* best\.pth"):
        rd.resolve_run(tmp_path, rd.BEST_CHECKPOINT, "checkpoint")
    with pytest.raises(FileNotFoundError, match="nope.yaml: no such file"):
        rd.config_file(tmp_path / "nope.yaml")


# ------------------------------------------------------------------------------------------------- atomic_write
@pytest.mark.parametrize("content", ["text ü\n", b"\x00bytes", lambda f: f.write(b"by a writer")])
def test_atomic_write_writes_and_leaves_nothing_else(tmp_path, content):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    assert rd.atomic_write(path, content) == str(path)
    expected = content.encode() if isinstance(content, str) else content if isinstance(content, bytes) else b"by a writer"
    assert path.read_bytes() == expected
    assert os.listdir(tmp_path) == ["f.bin"]
    assert (os.stat(path).st_mode & 0o777) == 0o666 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt(), OSError(28, "No space left")])
def test_atomic_write_keeps_the_old_file_and_removes_its_temp_file_on_any_failure(tmp_path, error):
    path = tmp_path / "metrics.json"
    path.write_text("old")

    def writer(f):
        f.write(b"half")
        raise error

    with pytest.raises(type(error)):
        rd.atomic_write(path, writer)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]


def test_atomic_write_json_and_test_metrics(tmp_path):
    ck = tmp_path / "best.pth"
    assert rd.check_test_metrics_writable(str(ck)) == str(tmp_path / rd.TEST_METRICS_FILE)
    rd.write_test_metrics(str(ck), {"R1": 1}, epoch=2, dataset_name="RSTPReid", root_dir="/d")
    assert rd.read_test_metrics(str(tmp_path)) == {"best.pth": {"checkpoint": str(ck), "epoch": 2, "split": "test",
                                                                "dataset_name": "RSTPReid", "root_dir": "/d",
                                                                "R1": 1.0}}
    (tmp_path / rd.TEST_METRICS_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match="test_metrics.json: expected a mapping .* got list; left unchanged"):
        rd.check_test_metrics_writable(str(ck))


def test_test_metrics_folder_not_writable_is_found_before(tmp_path):
    (tmp_path / "a_file").write_text("")  # a checkpoint path whose folder is a file: nothing can be written there
    with pytest.raises(OSError, match="a_file: cannot write the test_metrics.json there"):
        rd.check_test_metrics_writable(str(tmp_path / "a_file" / "best.pth"))
    if os.geteuid() != 0:  # root writes into read-only folders
        os.chmod(tmp_path, 0o555)
        try:
            with pytest.raises(OSError, match="cannot write the test_metrics.json there"):
                rd.check_test_metrics_writable(str(tmp_path / "best.pth"))
        finally:
            os.chmod(tmp_path, 0o755)


# ------------------------------------------------------------------------------------------------ careful reader
@pytest.mark.parametrize("data, found", [
    ("[{\"caption\": \"un café\"}]".encode("utf-16"), "UTF-16 LE (byte order mark FF FE)"),
    ("[{\"caption\": \"un café\"}]".encode("utf-16-be"), "UTF-16 without a byte order mark"),
    ("[{\"caption\": \"un café\"}]".encode("latin-1"), "Latin-1 / Windows-1252"),
    ("[{\"caption\": \"un café\"}]".encode("utf-32"), "UTF-32 LE"),
])
def test_reader_names_the_file_and_the_encoding_found(tmp_path, data, found):
    path = tmp_path / "anno.json"
    path.write_bytes(data)
    with pytest.raises(rd.FileReadError, match=rf"anno\.json: .*{re.escape(found)}") as err:
        rd.read_json(path, "annotation file")
    assert "UTF-8" in str(err.value)


def test_reader_position_of_a_bad_byte_and_utf8_bom(tmp_path):
    path = tmp_path / "configs.yaml"
    path.write_bytes(b"lr: 1\n# caf\xe9\n")
    with pytest.raises(rd.FileReadError, match=r"configs\.yaml: .*byte 0xe9 at line 2, column 6"):
        rd.read_text(path)
    path.write_bytes(b"\xef\xbb\xbf{\"a\": 1}")
    assert rd.read_json(path) == {"a": 1}


def test_reader_deep_nesting_and_malformed_json_are_named(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200000 + "]" * 200000)
    with pytest.raises(rd.FileReadError, match=r"deep\.json: the .* is nested too deeply"):
        rd.read_json(path)
    path.write_text("{")
    with pytest.raises(rd.FileReadError, match=r"Malformed JSON in '.*deep\.json'"):
        rd.read_json(path)
    with pytest.raises(FileNotFoundError, match="JSON file not found: '.*nope.json'"):
        rd.read_json(tmp_path / "nope.json")


def test_yaml_deep_nesting_and_latin1_are_named(tmp_path):
    from utils.iotools import load_train_configs
    path = tmp_path / "configs.yaml"
    path.write_text("a: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(rd.FileReadError, match=r"configs\.yaml: .*nested too deeply"):
        load_train_configs(str(path))
    path.write_bytes(b"lr: 0.1  # \xb5\n")
    with pytest.raises(ValueError, match=r"configs\.yaml: the config file is not UTF-8: byte 0xb5 at line 1"):
        load_train_configs(str(tmp_path))


def test_config_option_file_in_latin1_names_the_file(tmp_path):
    from utils.options import get_args
    cfg = tmp_path / "my.yaml"
    cfg.write_bytes(b"lr: 0.0001  # 10\xb5s\n")
    with pytest.raises(ValueError, match=r"^--config .*my\.yaml: the config file is not UTF-8: byte 0xb5 at line 1, "
                                         r"column 17; it looks like Latin-1"):
        get_args(["--config", str(cfg)])


# ------------------------------------------------------------------------------------------------- metrics.jsonl
def test_metrics_jsonl_truncated_last_record_is_skipped_and_trimmed(tmp_path, caplog):
    for e in (1, 2, 3):
        rd.append_metrics(str(tmp_path), {"epoch": e, "R1": float(e)})
    path = tmp_path / rd.METRICS_FILE
    with open(path, "a") as f:
        f.write('{"epoch": 4, "R1"')  # a kill during the append
    with caplog.at_level("WARNING", logger="IRRA.run_dir"):
        records, bad = rd.read_metrics(str(tmp_path))
    assert [r["epoch"] for r in records] == [1, 2, 3] and bad == []
    assert "line (4) is incomplete" in caplog.text
    # resume from epoch 3: epochs >= 3 and the cut line go; then appending continues on a fresh line
    rd.drop_metrics_from(str(tmp_path), 3)
    assert path.read_text() == '{"epoch": 1, "R1": 1.0}\n{"epoch": 2, "R1": 2.0}\n'
    with open(path, "a") as f:
        f.write('{"epoch": 3, "R')
    rd.append_metrics(str(tmp_path), {"epoch": 3, "R1": 3.5})
    records, bad = rd.read_metrics(str(tmp_path))
    assert [r["R1"] for r in records] == [1.0, 2.0, 3.5] and bad == [3]  # the cut line is now a bad middle line


def test_metrics_jsonl_bad_middle_line_and_bytes(tmp_path):
    path = tmp_path / rd.METRICS_FILE
    path.write_bytes(b'{"epoch": 1, "R1": 1}\n\xff\xfe\n{"x": 1}\n{"epoch": 2, "R1": 2}\n')
    records, bad = rd.read_metrics(str(tmp_path))
    assert [r["epoch"] for r in records] == [1, 2] and bad == [2, 3]
    rd.drop_metrics_from(str(tmp_path), 2)  # other lines are kept as they are
    assert path.read_bytes() == b'{"epoch": 1, "R1": 1}\n\xff\xfe\n{"x": 1}\n'
    assert rd.read_metrics(str(tmp_path / "none")) == ([], [])
    json.loads(json.dumps(records))
