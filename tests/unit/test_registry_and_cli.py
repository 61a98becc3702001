import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from zephyr.registry import ModelManifest, Registry, RegistryError, check_hf_folder

runner = CliRunner()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_import_list_show_remove(home, default_model):
    result = runner.invoke(app, ["models", "import", str(default_model.path), "--name", "tutor-copy"])
    assert result.exit_code == 0, result.output
    copied = home / "models" / "tutor-copy"
    assert (copied / "config.json").is_file()
    manifest = json.loads((copied / "zephyr.json").read_text())
    assert manifest["method"] == "imported" and manifest["name"] == "tutor-copy"

    listing = runner.invoke(app, ["models", "list"])
    assert "tutor-copy" in listing.output

    shown = runner.invoke(app, ["models", "show", "tutor-copy"])
    assert json.loads(shown.output)["path"] == str(copied)

    again = runner.invoke(app, ["models", "import", str(default_model.path), "--name", "tutor-copy"])
    assert again.exit_code == 1 and "pass --overwrite" in again.output  # which `models import` now takes
    replaced = runner.invoke(app, ["models", "import", str(default_model.path), "--name", "tutor-copy",
                                   "--overwrite"])
    assert replaced.exit_code == 0, replaced.output

    removed = runner.invoke(app, ["models", "remove", "tutor-copy", "--yes"])
    assert removed.exit_code == 0 and not copied.exists()


def test_a_copy_that_fails_part_way_leaves_no_hidden_half_copy(home, default_model, tmp_path):
    """A partial hub download (a dangling shard link) failed with a traceback and left `.NAME.incoming` behind."""
    source = tmp_path / "partial"
    shutil.copytree(default_model.path, source)
    (source / "model-00002-of-00002.safetensors").symlink_to(tmp_path / "never-downloaded")
    result = runner.invoke(app, ["models", "import", str(source), "--name", "partial"])
    assert result.exit_code == 1 and "copying" in result.output and "Traceback" not in result.output
    assert not [p.name for p in (home / "models").iterdir() if p.name.startswith(".partial")]


def test_cli_errors_are_one_line_with_exit_code_1(home, tmp_path):
    result = runner.invoke(app, ["models", "show", "nope"])
    assert result.exit_code == 1
    assert "no model 'nope'" in result.output and "Traceback" not in result.output

    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["models", "import", str(tmp_path / "empty"), "--name", "x"])
    assert result.exit_code == 1 and "no config.json" in result.output
    result = runner.invoke(app, ["models", "import", str(tmp_path / "empty"), "--name", "x", "--method", "lora"])
    assert result.exit_code == 1 and "--method" in result.output and "sft" in result.output


def test_registry_refuses_bad_names_missing_parents_and_orphaning(tmp_path, default_model):
    registry = Registry(tmp_path / "models")
    with pytest.raises(RegistryError, match="lowercase"):
        registry.add(default_model.path, ModelManifest(name="Bad Name", method="sft"))
    with pytest.raises(RegistryError, match="parent model 'ghost'"):
        registry.add(default_model.path, ModelManifest(name="child", method="sft", parent="ghost"))
    registry.add(default_model.path, ModelManifest(name="base", method="base"))
    registry.add(default_model.path, ModelManifest(name="child", method="dpo", parent="base"))
    with pytest.raises(RegistryError, match="parent of child"):
        registry.remove("base")
    with pytest.raises(RegistryError, match="already exists"):
        registry.add(default_model.path, ModelManifest(name="child", method="dpo", parent="base"))
    registry.record_eval("child", "arc_easy", {"accuracy": 0.5})
    assert registry.get("child").manifest.evals == {"arc_easy": {"accuracy": 0.5}}


def test_folder_without_chat_template_is_refused(tmp_path, default_model):
    folder = tmp_path / "no-template"
    shutil.copytree(default_model.path, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(RegistryError, match="chat template"):
        Registry(tmp_path / "models").add(folder, ModelManifest(name="x", method="sft"))


def test_serve_refuses_open_server_on_a_public_address(home):
    result = runner.invoke(app, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 1
    assert "ZEPHYR_API_KEYS" in result.output


def test_malformed_api_key_entry_is_reported(home, monkeypatch):
    monkeypatch.setenv("ZEPHYR_API_KEYS", "teacher:abc")
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 1 and "role:key" in result.output


def test_python_dash_m_cli_knows_every_command():
    """`python -m zephyr.cli review stats` used to say "No such command": its __main__ guard ran before the
    review commands were declared. The tests and the load-test harness start the CLI this way."""
    import subprocess
    import sys

    for command in (["review", "stats"], ["review", "export"], ["data", "clean"], ["eval", "gate"], ["quantize"]):
        result = subprocess.run([sys.executable, "-m", "cli", *command, "--help"], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0 and "Usage: zephyr" in result.stdout, (command, result.stderr[-500:])


def test_a_damaged_manifest_hides_no_other_model_and_says_how_to_recover(tmp_path, default_model):
    registry = Registry(tmp_path / "models")
    registry.add(default_model.path, ModelManifest(name="good", method="sft"))
    registry.add(default_model.path, ModelManifest(name="broken", method="sft"))
    manifest = registry.path_of("broken") / "zephyr.json"
    manifest.write_text(manifest.read_text()[:40])  # a disk that filled part way through an older write
    assert [e.name for e in registry.list()] == ["good"]
    with pytest.raises(RegistryError, match="cannot be read .* delete the folder"):
        registry.get("broken")
    registry.record_eval("good", "k", 1)  # written whole: beside the file, then renamed over it
    assert registry.get("good").manifest.evals == {"k": 1}
    assert [p.name for p in registry.path_of("good").iterdir() if p.name.startswith(".")] == []


def test_a_manifest_that_names_another_model_or_no_parent_name_is_refused(tmp_path, default_model):
    """A folder copied by hand still names the model it was copied from: read as it is, the copy's results and
    calibration would be written into the original's place."""
    registry = Registry(tmp_path / "models")
    registry.add(default_model.path, ModelManifest(name="a", method="sft"))
    shutil.copytree(registry.path_of("a"), registry.path_of("b"))
    with pytest.raises(RegistryError, match="names the model 'a', not 'b'.*set \"name\" to 'b'"):
        registry.get("b")
    assert [e.name for e in registry.list()] == ["a"]
    manifest = registry.path_of("b") / "zephyr.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "name": "b", "parent": "../a"}))
    with pytest.raises(RegistryError, match="names the parent '../a', which is no model name"):
        registry.get("b")
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "parent": "a"}))
    assert registry.get("b").manifest.parent == "a"


@pytest.mark.parametrize("content", [b"{oops", b"\xff\xfe", b"[1, 2]"])
def test_a_model_folder_with_a_broken_tokenizer_config_is_refused_in_words(tmp_path, default_model, content):
    folder = tmp_path / "hf"
    shutil.copytree(default_model.path, folder, ignore=shutil.ignore_patterns("zephyr.json", "chat_template.jinja"))
    (folder / "tokenizer_config.json").write_bytes(content)
    with pytest.raises(RegistryError, match="tokenizer_config.json (is not valid JSON|holds a JSON list)"):
        check_hf_folder(folder)


def test_a_model_cannot_replace_its_own_parent(tmp_path, default_model):
    registry = Registry(tmp_path / "models")
    registry.add(default_model.path, ModelManifest(name="base", method="base"))
    with pytest.raises(RegistryError, match="cannot replace its own parent"):
        registry.add(default_model.path, ModelManifest(name="base", parent="base", method="sft"), overwrite=True)
    replaced = registry.add(default_model.path, ModelManifest(name="base", method="sft"), overwrite=True)
    assert replaced.manifest.method == "sft" and [e.name for e in registry.list()] == ["base"]
    assert sorted(p.name for p in registry.models_dir.iterdir()) == [".lock", "base"]  # nothing left aside


def test_an_entry_others_were_made_from_is_never_replaced(tmp_path, default_model):
    registry = Registry(tmp_path / "models")
    registry.add(default_model.path, ModelManifest(name="base", method="base"))
    registry.add(default_model.path, ModelManifest(name="tuned", parent="base", method="dpo"))
    registry.add(default_model.path, ModelManifest(name="tuned-w8a8", parent="tuned", method="w8a8"))
    with pytest.raises(RegistryError, match="'tuned' is the parent of tuned-w8a8, made from its weights"):
        registry.add(default_model.path, ModelManifest(name="tuned", parent="base", method="dpo"), overwrite=True)
    assert registry.get("tuned").manifest.method == "dpo"  # untouched
    assert sorted(p.name for p in registry.models_dir.iterdir()) == [".lock", "base", "tuned", "tuned-w8a8"]
    registry.remove("tuned-w8a8")
    again = registry.add(default_model.path, ModelManifest(name="tuned", parent="base", method="sft"), overwrite=True)
    assert again.manifest.method == "sft"


def test_a_stopped_removal_leaves_no_half_model_and_a_leftover_folder_is_named(tmp_path, default_model, monkeypatch):
    registry = Registry(tmp_path / "models")
    registry.add(default_model.path, ModelManifest(name="base", method="base"))
    registry.add(default_model.path, ModelManifest(name="tuned", parent="base", method="dpo"))

    def stopped(path, *args, **kwargs):
        if not Path(path).exists():
            return
        (Path(path) / "zephyr.json").unlink(missing_ok=True)  # what rmtree may delete first
        raise KeyboardInterrupt

    monkeypatch.setattr("zephyr.registry.shutil.rmtree", stopped)
    with pytest.raises(KeyboardInterrupt):
        registry.remove("tuned")
    monkeypatch.undo()
    assert not (registry.models_dir / "tuned").exists()  # aside at once: the name is free, nothing half-listed
    assert [e.name for e in registry.list()] == ["base"]
    registry.add(default_model.path, ModelManifest(name="tuned", parent="base", method="sft"))
    # a folder without a manifest (an older version's stopped removal, a copy by hand) is named, not "exists"
    (registry.models_dir / "junk").mkdir()
    for overwrite in (False, True):
        with pytest.raises(RegistryError, match=r"models/junk holds no zephyr.json, so it is no model"):
            registry.check_free("junk", overwrite)
        with pytest.raises(RegistryError, match="holds no zephyr.json"):
            registry.add(default_model.path, ModelManifest(name="junk", method="sft"), overwrite=overwrite)


def test_replacing_an_entry_survives_an_aside_folder_an_earlier_replacement_could_not_delete(
        tmp_path, default_model, monkeypatch):
    """The old weights went aside under one fixed name: where an earlier replacement's rmtree left it half deleted
    (a file a server still held open), the rename failed with a raw OSError after a quantization or training run had
    done its work."""
    import shutil

    registry = Registry(tmp_path / "models")
    registry.add(default_model.path, ModelManifest(name="m", method="sft"))
    for stuck in (".m.replaced", ".m.replaced-1"):  # the fixed name before, a timed one now
        (registry.models_dir / stuck).mkdir()
        (registry.models_dir / stuck / ".nfs0001").write_text("held open")
    real_rmtree = shutil.rmtree
    monkeypatch.setattr("zephyr.registry.shutil.rmtree", lambda path, *args, **kwargs: None
                        if Path(path).name.startswith(".m.replaced") else real_rmtree(path, *args, **kwargs))
    again = registry.add(default_model.path, ModelManifest(name="m", method="dpo"), overwrite=True)
    assert again.manifest.method == "dpo" and [e.name for e in registry.list()] == ["m"]
    monkeypatch.undo()
    (registry.models_dir / ".m.removing").mkdir()  # a removal's, stopped by an older version
    registry.add(default_model.path, ModelManifest(name="m", method="kto"), overwrite=True)
    registry.remove("m")
    assert [p.name for p in registry.models_dir.iterdir()] == [".lock"]  # once free, the leftovers go too


def _quantized(folder, weight_bits: int, activation_bits: int | None):
    folder.mkdir()
    groups = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": weight_bits},
                          "input_activations": {"num_bits": activation_bits} if activation_bits else None}}
    (folder / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16", "quantization_config": {
        "quant_method": "compressed-tensors", "config_groups": groups}}))
    return folder


def test_4bit_weights_are_refused_where_vllms_cpu_build_has_no_4bit_kernel(tmp_path, monkeypatch):
    """vLLM's AVX2 CPU library lacks its W4A16 GEMM: such an engine started, then died at its first request."""
    from offline.engine import OfflineEngine
    from zephyr import registry
    from zephyr.settings import Settings

    w4a16 = _quantized(tmp_path / "tiny-gptq", 4, None)
    w8a8 = _quantized(tmp_path / "tiny-w8a8", 8, 8)
    monkeypatch.setattr(registry, "vllm_cpu_lacks_int4_kernel", lambda: "AVX2")
    problem = registry.vllm_serving_problem(w4a16)
    assert problem and problem.startswith("model tiny-gptq has 4-bit weights") and "(AVX2;" in problem
    assert "w8a8" in problem  # the way out
    assert registry.vllm_serving_problem(w8a8) is None
    with pytest.raises(RegistryError, match="has 4-bit weights"):  # offline runs refuse before vLLM loads
        OfflineEngine(w4a16, Settings(home=tmp_path))
    monkeypatch.setattr(registry, "vllm_cpu_lacks_int4_kernel", lambda: None)  # AVX-512, a GPU
    assert registry.vllm_serving_problem(w4a16) is None


def _record_many(models: str, worker: int, count: int) -> None:
    registry = Registry(Path(models))
    for i in range(count):
        registry.record_eval("base", f"w{worker}-{i}", {"accuracy": i / count})


def test_two_processes_recording_at_once_lose_nothing(tmp_path, default_model):
    """An eval run beside a calibration: each read the manifest, changed it and wrote it back, and the later write
    dropped the other's change (or removed the other's half-written file)."""
    import multiprocessing

    registry = Registry(tmp_path / "models")
    registry.add(default_model.path, ModelManifest(name="base", method="base"))
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_record_many, args=(str(tmp_path / "models"), w, 60)) for w in range(3)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(120)
    assert [p.exitcode for p in workers] == [0, 0, 0]
    assert len(registry.get("base").manifest.evals) == 180
    assert not list((tmp_path / "models" / "base").glob(".*partial"))


def test_cli_messages_show_names_as_written_and_bad_settings_in_one_line(home, monkeypatch):
    for name in ("[/x]", "a[b]c"):  # Rich markup in a quoted name: a MarkupError, or "[b]" eaten as bold
        result = runner.invoke(app, ["models", "show", name])
        assert result.exit_code == 1 and f"'{name}'" in result.output and "Traceback" not in result.output
    monkeypatch.setenv("ZEPHYR_HOME", "")
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 1
    assert "ZEPHYR_HOME: is empty: unset it, or give a path" in " ".join(result.output.split())
    monkeypatch.delenv("ZEPHYR_HOME")
    monkeypatch.setenv("ZEPHYR_PII_ENTITIES", "[]")  # a check across settings: no field to name ("ZEPHYR_: ...")
    said = " ".join(runner.invoke(app, ["models", "list"]).output.split())
    assert "bad configuration: ZEPHYR_PII_ENTITIES" in said and "ZEPHYR_:" not in said
    monkeypatch.delenv("ZEPHYR_PII_ENTITIES")
    result = runner.invoke(app, ["serve", "--log-level", "verbose"])
    assert result.exit_code == 2 and "'verbose' is not one of" in " ".join(result.output.split())


def test_mcq_refuses_explain_beside_another_method(home):
    result = runner.invoke(app, ["mcq", "Which is a gas?", "-o", "air", "-o", "ice", "--method", "cloze", "--explain"])
    assert result.exit_code == 1 and "drop one of --explain and --method cloze" in " ".join(result.output.split())


def test_mcq_against_no_server_is_one_line(home):
    for url in ("foo", "http://127.0.0.1:9"):
        result = runner.invoke(app, ["mcq", "q?", "-o", "a", "-o", "b", "--url", url])
        assert result.exit_code == 1 and "Traceback" not in result.output and url in result.output, result.output


def test_chat_and_mcq_against_a_server_that_is_not_zephyr_are_one_line(home):
    """A 200 that is a web page, or JSON of another shape, crashed both commands with a traceback."""
    import http.server
    import threading

    class WebPage(http.server.BaseHTTPRequestHandler):
        def answer(self, body: bytes, kind: str):
            self.send_response(200)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802 (http.server's name)
            self.answer(b"<html>hello</html>", "text/html")

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["content-length"]))
            self.answer(b'{"ok": true}', "application/json")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), WebPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        chat = runner.invoke(app, ["chat", "--url", url], input="/quit\n")
        mcq = runner.invoke(app, ["mcq", "q?", "-o", "a", "-o", "b", "--url", url])
    finally:
        server.shutdown()
    for result in (chat, mcq):
        assert result.exit_code == 1 and "Traceback" not in result.output and url in result.output, result.output


def test_an_imported_folder_records_where_it_came_from(home, default_model, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(default_model.path, tmp_path / "folder")
    result = runner.invoke(app, ["models", "import", "~/folder", "--name", "from-home"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((home / "models" / "from-home" / "zephyr.json").read_text())
    assert manifest["source"] == str(tmp_path / "folder")


def test_chat_says_in_one_line_when_the_stream_breaks_off_and_goes_on(home):
    """The server sends an error event inside a stream that had begun (its engine stopped): the official client
    raises its base APIError, which the command reported as a traceback (then ended the session on it)."""
    import http.server
    import threading

    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Light "}, "finish_reason": None}]}

    class Server(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"object": "list", "data": [{"id": "m", "object": "model", "created": 0,
                                                           "owned_by": "zephyr"}]}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            error = {"error": {"message": "the engine stopped", "type": "server_error", "code": "engine_unavailable"}}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(error)}\n\n".encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = runner.invoke(app, ["chat", "--url", f"http://127.0.0.1:{server.server_port}/v1"],
                               input="Why is the sky blue?\nAnd why is it red at sunset?\n")
    finally:
        server.shutdown()
    said = " ".join(result.output.split())
    assert result.exit_code == 0 and "Traceback" not in said, result.output
    assert said.count("the answer broke off: the engine stopped; ask again") == 2  # asked again after the first


def test_two_writers_of_one_name_never_mix_their_weights(tmp_path, default_model, monkeypatch):
    """Two replicas' init containers preparing the model on one volume: each add deleted the other's staging copy,
    and the entry could end up with both writers' files. The second now waits, then finds the name taken."""
    import threading

    registry = Registry(tmp_path / "models")
    a, b = tmp_path / "a", tmp_path / "b"
    for source in (a, b):
        shutil.copytree(default_model.path, source)
        (source / f"from-{source.name}").write_text(source.name)
    copied, go_on = threading.Event(), threading.Event()
    real_copytree = shutil.copytree

    def slow_copytree(src, dst, **kwargs):
        result = real_copytree(src, dst, **kwargs)
        if Path(src) == a:
            copied.set()
            go_on.wait(10)
        return result

    monkeypatch.setattr(shutil, "copytree", slow_copytree)
    refused = []

    def add_b():
        try:
            registry.add(b, ModelManifest(name="m", method="imported"))
        except RegistryError as exc:
            refused.append(str(exc))

    first = threading.Thread(target=registry.add, args=(a, ModelManifest(name="m", method="imported")))
    first.start()
    assert copied.wait(10)
    second = threading.Thread(target=add_b)
    second.start()
    second.join(0.5)  # unlocked, it would now have replaced the first writer's staging copy with its own
    go_on.set()
    first.join(10)
    second.join(10)
    files = {path.name for path in registry.get("m").path.iterdir()}
    assert "from-a" in files and "from-b" not in files
    assert len(refused) == 1 and "already exists" in refused[0]


def test_a_result_is_not_recorded_into_an_entry_made_again_while_it_was_measured(tmp_path, default_model):
    registry = Registry(tmp_path / "models")
    measured = registry.add(default_model.path, ModelManifest(name="m", method="imported"))
    registry.add(default_model.path, ModelManifest(name="m", method="imported"), overwrite=True)  # `--overwrite`
    for record in (lambda made_at: registry.record_calibration("m", None, made_at=made_at),
                   lambda made_at: registry.record_eval("m", "mcq", {"accuracy": 0.5}, made_at=made_at)):
        with pytest.raises(RegistryError, match="made again while it was measured"):
            record(measured.manifest.created_at)
    registry.record_eval("m", "mcq", {"accuracy": 0.5}, made_at=registry.get("m").manifest.created_at)
    assert registry.get("m").manifest.evals == {"mcq": {"accuracy": 0.5}}


@pytest.mark.parametrize("option", ["[a, b]", "[/]", "f(x) = [x]"])
def test_mcq_prints_the_option_as_written(home, monkeypatch, option):
    """The option went through Rich's markup: "[a, b]" vanished, and "[/]" ended in a traceback."""
    import httpx

    body = {"abstained": False, "answer": "B", "option": option, "probabilities": {"A": 0.2, "B": 0.8},
            "confidence": 0.8, "method": "auto", "calibrated": True}
    monkeypatch.setattr(httpx, "post", lambda *a, **k: httpx.Response(200, json=body))
    result = runner.invoke(app, ["mcq", "Which?", "-o", "(0, 1)", "-o", option])
    assert result.exit_code == 0 and f"B. {option}" in result.output, result.output


def test_a_bad_option_is_named_as_typed_and_a_bad_variable_as_set(home, monkeypatch):
    result = runner.invoke(app, ["serve", "--port", "0"])
    said = " ".join(result.output.split())
    assert result.exit_code == 1 and "bad configuration: --port: Input should be greater than or equal to 1" in said
    monkeypatch.setenv("ZEPHYR_PORT", "0")
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 1 and "ZEPHYR_PORT: Input should be" in " ".join(result.output.split())


def test_models_prepare_on_a_home_it_cannot_write_is_one_line(tmp_path, monkeypatch):
    """The chart's init container: a ZEPHYR_HOME under a file (or a read-only volume) was a traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ZEPHYR_HOME", str(blocker / "home"))
    result = runner.invoke(app, ["models", "prepare"])
    assert result.exit_code == 1 and "cannot prepare the registry" in " ".join(result.output.split()), result.output


@pytest.mark.parametrize("cross_device", [False, True])
def test_a_move_that_fails_leaves_the_weights_where_they_were_and_no_hidden_copy(tmp_path, default_model, monkeypatch,
                                                                                 cross_device):
    """A moved-in folder is the only copy of a quantize run's weights: a failure after it came in (the manifest not
    written: a full disk) left it as a hidden `.NAME.incoming` in the models folder, and a raw OSError. Across
    filesystems shutil.move copied, then deleted the source: a delete that failed part way left the staging copy
    as the only whole one, which the clean-up then deleted (found by a review)."""
    import errno
    import os

    registry = Registry(tmp_path / "models")
    source = tmp_path / "run-output"
    shutil.copytree(default_model.path, source, ignore=shutil.ignore_patterns("zephyr.json"))
    before = sorted(p.name for p in source.iterdir())
    real_rename, real_write_text = Path.rename, Path.write_text
    if cross_device:
        def no_rename_across(self, target):
            if self == source:
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
            return real_rename(self, target)
        monkeypatch.setattr(Path, "rename", no_rename_across)

    def full_disk(self, *args, **kwargs):
        if self.name == "zephyr.json":
            raise OSError(28, "No space left on device")
        return real_write_text(self, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(RegistryError, match=f"moving {source} into the registry failed: .*No space left"):
        registry.add(source, ModelManifest(name="q", method="imported"), move=True)
    assert sorted(p.name for p in source.iterdir()) == before  # the weights are where they were, without a manifest
    assert not [p.name for p in registry.models_dir.iterdir() if p.name.startswith(".") and "q" in p.name]
    assert not registry.exists("q")
    monkeypatch.setattr(Path, "write_text", real_write_text)
    entry = registry.add(source, ModelManifest(name="q", method="imported"), move=True)
    assert sorted(p.name for p in entry.path.iterdir()) == sorted([*before, "zephyr.json"])
    assert not source.exists()  # moved: across filesystems, its source deleted once the entry was in


def test_a_reward_model_is_refused_as_a_model_to_serve_or_score(tmp_path, monkeypatch):
    """A reward model (a sequence classifier) was handed to vLLM by `serve`, `eval run` and the data samplers,
    which failed after the engine's start-up or at the first request."""
    from offline.engine import OfflineEngine
    from zephyr import registry
    from zephyr.settings import Settings

    scorer = tmp_path / "tiny-rm"
    scorer.mkdir()
    (scorer / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
    problem = registry.vllm_serving_problem(scorer)
    assert problem and problem.startswith("model tiny-rm is a reward or classification model "
                                          "(LlamaForSequenceClassification)")
    with pytest.raises(RegistryError, match="reward or classification model"):
        OfflineEngine(scorer, Settings(home=tmp_path))
    # chat models vLLM serves under other names than *ForCausalLM (the review of the first version refused them)
    for chat_model in ("LlamaForCausalLM", "GPT2LMHeadModel", "Gemma3ForConditionalGeneration"):
        (scorer / "config.json").write_text(json.dumps({"architectures": [chat_model]}))
        assert registry.vllm_serving_problem(scorer) is None, chat_model

    (scorer / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
    for name in ("model.safetensors", "tokenizer.json", "chat_template.jinja"):  # there, whatever they hold
        (scorer / name).write_text("{}")
    monkeypatch.setenv("ZEPHYR_HOME", str(tmp_path / "home"))
    Registry(tmp_path / "home" / "models").add(scorer, ModelManifest(name="tiny-rm", method="rm"))
    result = runner.invoke(app, ["serve", "--model", "tiny-rm"])
    assert result.exit_code == 1 and "reward or classification model" in " ".join(result.output.split())


def test_a_registry_that_cannot_be_written_is_one_line_for_import_and_remove(tmp_path, default_model, monkeypatch):
    """`models import` and `models remove` caught only the registry's own errors: a volume that cannot be written
    (here its lock file cannot be opened) was a traceback."""
    home = tmp_path / "home"
    Registry(home / "models").add(default_model.path, ModelManifest(name="kept", method="imported"))
    (home / "models" / ".lock").unlink(missing_ok=True)
    (home / "models" / ".lock").mkdir()  # opening it for the lock fails as a read-only volume would
    monkeypatch.setenv("ZEPHYR_HOME", str(home))
    for args, doing in ((["models", "import", str(default_model.path), "--name", "copy"], "cannot import"),
                        (["models", "remove", "kept", "--yes"], "cannot remove kept")):
        result = runner.invoke(app, args)
        said = " ".join(result.output.split())
        assert result.exit_code == 1 and doing in said and "Traceback" not in said, said


def test_a_manifest_written_back_never_lands_on_weights_that_replaced_it(tmp_path, default_model):
    """Recording a result locked the entry's folder, which `add --overwrite` does not take: weights imported between
    the read and the write-back got the old entry's manifest (its method, parent, calibration)."""
    import threading

    registry = Registry(tmp_path / "models")
    old = registry.add(default_model.path, ModelManifest(name="m", method="imported"))
    inside, replaced = threading.Event(), threading.Event()

    def overwrite():
        inside.wait(10)
        registry.add(default_model.path, ModelManifest(name="m", method="sft"), overwrite=True)
        replaced.set()

    writer = threading.Thread(target=overwrite)
    writer.start()
    try:
        with registry._updating("m", old.manifest.created_at) as entry:
            inside.set()
            assert not replaced.wait(1.0)  # the overwrite waits for the write-back
            entry.manifest.evals["k"] = 1
            registry._save(entry)
    finally:
        writer.join(60)
    now = registry.get("m").manifest
    assert now.method == "sft" and "k" not in now.evals


def test_a_child_whose_manifest_cannot_be_validated_still_keeps_its_parent(tmp_path, default_model, monkeypatch):
    """`children_of` read `list()`, which skips an entry it cannot validate: its parent could be removed."""
    registry = Registry(tmp_path / "models")
    registry.add(default_model.path, ModelManifest(name="p", method="imported"))
    registry.add(default_model.path, ModelManifest(name="c", method="sft", parent="p"))
    manifest = tmp_path / "models" / "c" / "zephyr.json"
    raw = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**raw, "method": "a-method-of-a-newer-version"}))
    with pytest.raises(RegistryError, match="parent of c"):
        registry.remove("p")
    manifest.write_text("{")  # not even JSON: it may be p's child, so p stays
    with pytest.raises(RegistryError, match="cannot tell whether 'c' was made from 'p'"):
        registry.remove("p")
    assert registry.exists("p")

    real = type(manifest).read_text
    monkeypatch.setattr(type(manifest), "read_text",
                        lambda self, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if self == manifest else real(self, *a, **k))
    assert [e.name for e in registry.list()] == ["p"]  # the unreadable one is skipped, with a warning
    with pytest.raises(RegistryError, match="cannot be read \\(Permission denied\\)"):
        registry.get("c")


def test_a_shipped_record_never_replaces_an_operators_own(tmp_path, default_model):
    from zephyr.mcq import MCQCalibration

    registry = Registry(tmp_path / "models")
    registry.add(default_model.path, ModelManifest(name="m", method="imported"))
    own = MCQCalibration(method="cloze", weights={"cloze": 1.0})
    assert registry.record_calibration("m", own)
    assert not registry.record_calibration("m", MCQCalibration(method="letter", weights={"letter": 1.0}), shipped=True)
    assert registry.get("m").manifest.mcq_calibration == own


def test_a_folder_that_cannot_be_looked_into_is_one_line_and_may_be_a_child(tmp_path, default_model, monkeypatch):
    """Python 3.11's is_file raises on a folder of mode 000 (another account's): `models show` was a traceback. Such
    a folder under a model's name may be a child, so its possible parent stays (the follow-up review found the first
    version skipped it, and let the parent go); one under no model's name (`lost+found`) blocks nothing."""
    registry = Registry(tmp_path / "models")
    registry.add(default_model.path, ModelManifest(name="p", method="imported"))
    models = tmp_path / "models"
    closed = {models / "c", models / "lost+found"}
    for folder in closed:
        folder.mkdir()
    real = type(models).is_file
    monkeypatch.setattr(type(models), "is_file", lambda self: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")) if self.parent in closed else real(self))
    with pytest.raises(RegistryError, match="cannot look into .*/c \\(Permission denied\\)"):
        registry.get("c")
    assert [e.name for e in registry.list()] == ["p"]
    with pytest.raises(RegistryError, match="cannot tell whether 'c' was made from 'p'"):
        registry.remove("p")
    (models / "c").rmdir()
    closed.discard(models / "c")
    registry.remove("p")  # lost+found is no model's folder
    assert not registry.exists("p")
