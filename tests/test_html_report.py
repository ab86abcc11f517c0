"""report.html (export/html_report.py) and `abs report`: the page is well-formed, self-contained,
has every layer and one mark per value in its plots, escapes the report's text, says why a
section is missing, and shows its plots in a real browser when one is installed."""

import errno
import json
import math
import os
import random
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from abs_deploy import bops, files
from abs_deploy.cli import main
from abs_deploy.export import md_report, report
from abs_deploy.export.html_report import render
from abs_deploy.export.latency import Timing
from abs_deploy.export.report_format import FLOAT_BITS
from abs_deploy.models.registry import arch_record, build_model
from abs_deploy.train import EpochLog

PLOT_H = 170  # html_report._PLOT_H: the height of a full bar


# --- a realistic report: resnet20's real layers, random bits and pruning, the real builders ---


def _layer_rows(seed: int = 0) -> list[dict]:
    """Rows as `report.layer_rows` writes them, for resnet20's layers and a random decision."""
    rng = random.Random(seed)
    costs = bops.layer_costs(build_model(arch_record("resnet20", num_classes=10)), (1, 3, 32, 32))
    rows = []
    for i, c in enumerate(costs):
        w, a = (8, 8) if i in (0, len(costs) - 1) else (rng.choice((2, 4, 8)), rng.choice((2, 4)))
        if i == 3:
            w = a = FLOAT_BITS  # a layer left in float
        kept = c.c_out if c.kind == "linear" else rng.randint(c.c_out // 2, c.c_out)
        macs = c.macs_kept(kept)
        weights = kept * (c.c_in // c.groups) * c.kernel
        rows.append({
            "name": c.name, "kind": c.kind, "w_bits": w, "a_bits": a, "a_signed": i == 0,
            "w_store_bits": 7 if w == 8 else w, "kept": kept, "total": c.c_out,
            "in_kept": c.c_in, "in_total": c.c_in, "macs": macs, "fp_macs": c.macs,
            "bops": macs * w * a, "fp_bops": c.macs * 32 * 32, "params": weights + kept,
            "fp_params": weights + kept, "weight_bytes": math.ceil(weights * w / 8) + 4 * kept,
            "fp_weight_bytes": 4 * (weights + kept),
            "act_clip": None if a == FLOAT_BITS else [0, 2 ** a - 1], "act_folded": None})
    return rows


def _history() -> list[dict]:
    """As the checkpoints write it: pretraining (no stage), ABS epochs with BOPs, a refine
    epoch without them, fine-tuning."""
    def log(epoch, val, stage=None, **extra):
        d = EpochLog(epoch, 0.5 / epoch, min(1.0, val + 0.01), val, 1.2, extra).as_dict()
        return {"stage": stage, **d} if stage else d
    pre = [log(e, 0.5 + 0.09 * e) for e in range(1, 6)]
    search = [log(e, 0.93 - 0.01 * e, "abs", bops=4.0e8 / 2 ** e, fp_ratio=2 ** e, lam=0.1,
                  bits="w 2:3 4:5 | a 4:8 | pruned 12/96") for e in range(1, 7)]
    refine = [log(1, 0.9, "abs", phase="refine")]
    tune = [log(e, 0.9 + 0.01 * e, "finetune") for e in range(1, 4)]
    return pre + search + refine + tune


def _report(rows: list[dict] | None = None) -> dict:
    rows = rows or _layer_rows()
    fp_params = sum(r["fp_params"] for r in rows)
    timings = [Timing(m, b, t, med * b * (1 + 0.3 * (t - 1)), med * b * 1.4, 50)
               for t in (1, 2) for b in (1, 32)
               for m, med in (("fp_original", 0.30), ("fp_pruned", 0.22), ("qcdq", 0.15))]
    parity = {"logits_rel": 1e-7, "end_to_end_logits_rel": 0.136, "top1_agreement": 1.0,
              "codes_equal": 0.99999, "codes_max_diff": 1, "passed": True, "failure": None}
    return {
        "format": report.FORMAT, "checkpoint": "runs/r20/model.pt", "stage": "finetuned",
        "method": "abs", "arch": "resnet20", "dataset": "cifar10", "input_shape": [1, 3, 32, 32],
        "options": {"opset": 21, "weights": "int8", "simplified": True, "reduce_range": True},
        "layers": rows,
        "totals": report.totals(rows, fp_params, sum(r["params"] for r in rows), None, 123456),
        "accuracy": {"fp_original": 0.92, "fp_source": "checkpoint", "float_weights": 0.11,
                     "pruned_float": 0.913, "pruned_float_clipped": True, "reference": 0.905,
                     "ort": 0.905, "ort_unoptimized": 0.905, "images": 512},
        "checkpoint_metrics": {"top1": 0.905},
        "parity": {"pruning": {"logits_rel": 0.0, "onnx_logits_rel": 3e-7,
                               "worst_layer": rows[1]["name"], "worst_layer_rel": 0.0},
                   "ort_unoptimized": parity,
                   "ort_optimized": {**parity, "layers": [
                       {"layer": r["name"], "elements": 100, "equal": 1.0, "max_diff": 0}
                       for r in rows]}},
        "latency": report.latency_section(timings, "Test CPU @ 2.0GHz"),
        "notes": ["a note"],
        "history": report.history_section(_history()),
        "files": {"onnx": "model.onnx", "json": "report.json", "html": "report.html"},
        "seconds": {"load": 0.1, "total": 4.2},
    }


# --- reading the page back ---------------------------------------------------------------------


class _Tree(HTMLParser):
    """Checks that every element is closed in order and collects tag names and text."""

    VOID = {"meta", "br", "img", "input", "link", "hr", "col", "source", "wbr"}
    # SVG elements written self-closing (<line .../>): the HTML parser reports them as such.

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> _Tree:
    tree = _Tree()
    tree.feed(page)
    tree.close()
    assert tree.stack == [], f"unclosed elements {tree.stack}"
    return tree


def _svgs(page: str) -> dict[str, ET.Element]:
    """Each inline SVG parsed as XML (so it is well-formed), by id."""
    return {m.group(1): ET.fromstring(m.group(0))
            for m in re.finditer(r'<svg id="([^"]+)".*?</svg>', page, re.S)}


def _marks(svg: ET.Element, tag: str, *css: str) -> list[ET.Element]:
    """The `tag` elements carrying every class in `css` (a legend swatch lacks "bar")."""
    return [e for e in svg.iter(f"{{http://www.w3.org/2000/svg}}{tag}")
            if set(css) <= set(e.get("class", "").split())]


def _table_rows(page: str, section: str) -> list[str]:
    body = re.search(rf'<section id="{section}">.*?<tbody>(.*?)</tbody>', page, re.S).group(1)
    return re.findall(r"<tr[^>]*>.*?</tr>", body, re.S)


# --- the page ----------------------------------------------------------------------------------


def test_page_is_well_formed_and_lists_every_layer_in_order():
    rep = _report()
    page = render(rep)
    _parse(page)
    rows = _table_rows(page, "layers")
    assert len(rows) == len(rep["layers"])
    for row, layer in zip(rows, rep["layers"], strict=True):
        assert f"<code>{layer['name']}</code>" in row
    for plot in ("plot-bits", "plot-kept", "plot-bops"):
        names = [t.text for t in _svgs(page)[plot].iter("{http://www.w3.org/2000/svg}text")
                 if "name" in t.get("class", "").split()]
        assert names == [r["name"] for r in rep["layers"]]


def test_page_loads_nothing_from_outside():
    tree = _parse(render(_report()))
    tags = {t for t, _ in tree.tags}
    assert not tags & {"script", "link", "iframe", "img", "object", "embed"}
    assert not any(k in ("src", "href") for _, attrs in tree.tags for k in attrs)
    csp = [a["content"] for t, a in tree.tags if a.get("http-equiv") ==
           "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]


def test_per_layer_plots_have_one_bar_per_layer_and_series():
    rep = _report()
    svgs = _svgs(render(rep))
    n = len(rep["layers"])
    for plot, classes in (("plot-bits", ("s-w", "s-a")), ("plot-kept", ("s-kept",)),
                          ("plot-bops", ("s-fp", "s-ours"))):
        for css in classes:
            assert len(_marks(svgs[plot], "rect", "bar", css)) == n, (plot, css)


def test_bar_heights_follow_the_values():
    rep = _report()
    svgs = _svgs(render(rep))
    rows = rep["layers"]
    kept = [float(b.get("height")) for b in _marks(svgs["plot-kept"], "rect", "bar", "s-kept")]
    assert kept == pytest.approx([PLOT_H * r["kept"] / r["total"] for r in rows], abs=0.06)
    w = [float(b.get("height")) for b in _marks(svgs["plot-bits"], "rect", "bar", "s-w")]
    top = 16  # the fixture has a float layer, so the axis goes to 16 and float sits there
    assert w == pytest.approx([PLOT_H * min(r["w_bits"], top) / top for r in rows], abs=0.06)
    # Logarithmic BOPs: the gap between the FP and the compressed bar is log10 of their ratio.
    fp = [float(b.get("height")) for b in _marks(svgs["plot-bops"], "rect", "bar", "s-fp")]
    ours = [float(b.get("height")) for b in _marks(svgs["plot-bops"], "rect", "bar", "s-ours")]
    values = [v for r in rows for v in (r["fp_bops"], r["bops"])]
    decades = math.ceil(math.log10(max(values))) - math.floor(math.log10(min(values)))
    for r, f, o in zip(rows, fp, ours, strict=True):
        assert f - o == pytest.approx(PLOT_H * math.log10(r["fp_bops"] / r["bops"]) / decades,
                                      abs=0.11)


def test_trajectory_has_a_point_per_epoch_after_pretraining():
    rep = _report()
    page = render(rep)
    svgs = _svgs(page)
    staged = [h for h in rep["history"] if h.get("stage")]
    pretrain = len(rep["history"]) - len(staged)
    assert len(_marks(svgs["plot-acc"], "circle", "pt-acc")) == len(staged)
    with_bops = [h for h in staged if h.get("bops")]
    points = _marks(svgs["plot-traj-bops"], "circle", "pt-bops")
    assert len(points) == len(with_bops) > 0
    # BOPs fall every search epoch in the fixture: each point sits higher on the page (smaller
    # y) than the next one does.
    ys = [float(p.get("cy")) for p in points]
    assert ys == sorted(ys)
    stages = [t.text for t in svgs["plot-acc"].iter("{http://www.w3.org/2000/svg}text")
              if t.get("class") == "stage"]
    assert stages == ["abs", "abs (refine)", "finetune"]
    assert f"{pretrain} pretraining epochs" in page


def test_latency_bars_mark_the_fastest_of_each_setting_and_say_how_it_was_measured():
    rep = _report()
    page = render(rep)
    rows = rep["latency"]["rows"]
    bars = _marks(_svgs(page)["plot-latency"], "rect", "lat")
    assert len(bars) == len(rows)
    settings = {(r["batch"], r["threads"]) for r in rows}
    fastest = [b for b in bars if "fastest" in b.get("class").split()]
    assert len(fastest) == len(settings)
    for s in settings:
        best = min((r for r in rows if (r["batch"], r["threads"]) == s),
                   key=lambda r: r["median_ms"])
        assert any(f"{best['median_ms']:.3f} ms" in b.find(
            "{http://www.w3.org/2000/svg}title").text for b in fastest)
    assert sum(r.startswith("<tr class=\"fastest\">") for r in _table_rows(page, "latency")) \
        == len(settings)
    for words in ("Test CPU @ 2.0GHz", "50 timed runs", "warm-up", "median", "90th percentile"):
        assert words in page


@pytest.mark.parametrize("change, says, gone", [
    ({"latency": None}, "--skip-latency", "plot-latency"),
    ({"history": []}, "records no training history", "plot-acc"),
    ({"history": None}, "predates the training history", "plot-acc"),
])
def test_a_missing_section_is_one_line_not_a_crash(change, says, gone):
    rep = {**_report(), **change}
    if change.get("history", 0) is None:
        del rep["history"]
    page = render(rep)
    _parse(page)
    assert says in page and gone not in _svgs(page)


def test_history_without_bops_plots_accuracy_only():
    rep = _report()
    rep["history"] = [h for h in rep["history"] if "bops" not in h]
    svgs = _svgs(render(rep))
    assert "plot-acc" in svgs and "plot-traj-bops" not in svgs


def test_further_runtimes_in_parity_get_a_line_each_in_html_and_markdown():
    rep = _report()
    rep["parity"]["openvino"] = {"accuracy": 0.904, "top1_agreement": 0.998, "passed": True}
    rep["parity"]["ort_format"] = {"accuracy": 0.9, "onnx_top1_agreement": 1.0, "passed": True}
    for text in (render(rep), md_report.markdown(rep).replace("\\_", "_")):
        assert "openvino vs reference: top-1 90.40%, top-1 agreement 99.80%" in text
        assert "ort_format vs reference: top-1 90.00%" in text


def test_accuracy_shows_the_pruned_float_model_not_the_unmasked_weights():
    """With the masks off a pruned decision's filters come back (the checkpoint's weights in
    float read 10% for the fine-tuned ResNet-20s); the row a user reads is the pruned float
    model. A report written before that figure existed still renders its old row."""
    rep = _report()
    for text in (render(rep), md_report.markdown(rep)):
        assert "pruned float model (model.fp32.onnx)" in text and "91.30%" in text
        assert "11.00%" not in text and "no mask" not in text
        assert "clipped to its range" in text and "speed reference" not in text
    # Written before model.fp32.onnx clipped its activations: its row says what it was.
    del rep["accuracy"]["pruned_float_clipped"]
    for text in (render(rep), md_report.markdown(rep)):
        assert "91.30%" in text and "speed reference only" in text
        assert "clipped to its range" not in text
    del rep["accuracy"]["pruned_float"]
    for text in (render(rep), md_report.markdown(rep)):
        assert "checkpoint weights in float" in text and "11.00%" in text


def test_kernels_get_a_section_in_html_and_markdown_when_counted():
    rep = _report()
    assert "Kernels" not in md_report.markdown(rep)
    rep["kernels"] = {"onnxruntime": {"integer_layers": 3, "float_layers": 5, "integer_adds": 0,
                                      "adds": 1, "weights_dequantized": 5}}
    for text in (render(rep), md_report.markdown(rep)):
        assert "3 of 8 layers on integer kernels, 0 of 1 residual adds" in text


def test_text_from_the_report_is_escaped():
    rows = _layer_rows()
    evil = '<script>alert("x")</script>&'
    rows[2]["name"] = evil
    rep = _report(rows)
    rep["checkpoint"] = 'a"b<c>.pt'
    rep["notes"] = ["<marquee>moving</marquee>"]
    rep["latency"]["cpu"] = "<i>cpu</i>"
    rep["history"][-1]["stage"] = "<u>tune</u>"
    rep["accuracy"]["images"] = "<u>512</u>"
    rep["layers"][0]["in_kept"] = "<u>3</u>"
    rep["latency"]["rows"][0]["batch"] = "<u>1</u>"
    for row in rep["latency"]["rows"]:
        row["runs"] = "<u>50</u>"
    rep["parity"]["<u>rt</u>"] = {"accuracy": 0.9}
    page = render(rep)
    tree = _parse(page)
    assert not {"script", "marquee", "i", "u"} & {t for t, _ in tree.tags}
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in page
    assert evil in "".join(tree.text)  # shown as text, as written
    _svgs(page)  # the SVGs holding the name are still well-formed XML


def test_markdown_escapes_text_from_the_report():
    """report.md quotes report.json, anyone's file; Markdown viewers render HTML in it."""
    rows = _layer_rows()
    rows[2]["name"] = "<script>alert(1)</script>"
    rows[3]["name"] = "a|b`c`*d*"
    rep = _report(rows)
    rep["checkpoint"] = "<img src=x onerror=alert(1)>.pt"
    rep["arch"] = "[click](javascript:alert(1))"
    rep["dataset"] = "cifar10 & <b>more</b>"
    rep["notes"] = ["<iframe src=x>", "two\n# lines"]
    rep["latency"]["cpu"] = "<i>cpu</i>"
    md = md_report.markdown(rep)
    assert "<" not in md and ">" not in md  # every tag of the source is now text
    assert "&lt;img src=x onerror=alert(1)&gt;" in md and "&amp; &lt;b&gt;" in md
    assert "\\[click\\](javascript" in md  # brackets escaped: no link
    assert "`c`" not in md and "*d*" not in md
    assert "\n# lines" not in md
    layers = md.split("## Layers", 1)[1].splitlines()[2:]
    cells = [len(re.findall(r"(?<!\\)\|", line)) for line in layers if line.startswith("|")]
    assert cells == [9] * (len(rows) + 2)  # header, rule, rows: a | in a name splits none


def test_history_section_keeps_plain_values_only():
    hist = report.history_section([{"epoch": 1, "val_acc": 0.5, "bops": float("inf"),
                                    "bits": {"w": 2}, "note": "x", "flag": True}, "junk", 3])
    assert hist == [{"epoch": 1, "val_acc": 0.5, "bops": None, "note": "x", "flag": True}]
    assert report.history_section(None) == []
    json.dumps(hist, allow_nan=False)


# --- files and `abs report` ---------------------------------------------------------------------


def test_write_adds_the_html_and_rebuild_remakes_it_from_the_json(tmp_path):
    rep = _report()
    paths = report.write(rep, tmp_path)
    assert set(paths) == {"json", "md", "png", "html"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "report.html", "report.json", "report.md", "report.png"]
    first = paths["html"].read_text()
    assert first == render(json.loads(paths["json"].read_text()))
    for p in ("html", "md", "png"):
        paths[p].unlink()
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert paths["html"].read_text() == first
    assert paths["md"].is_file() and paths["png"].stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # no temporary file left
        "report.html", "report.json", "report.md", "report.png"]


def _one_line_error(result, words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert words in lines[0], lines[0]
    assert "Traceback" not in result.output


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    def put(name: str, content: str | bytes) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        path = folder / "report.json"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path
    good = _report()
    no_layers = {**good, "layers": "conv1"}
    bad_value = json.loads(json.dumps(good))
    bad_value["layers"][0]["bops"] = "many"
    (tmp_path / "empty").mkdir()
    return {
        "no such folder": (tmp_path / "nope", "no such file or folder"),
        "folder without report": (tmp_path / "empty", "no report.json in this folder"),
        "corrupt": (put("corrupt", b'{"layers": [\xff'), "not valid JSON"),
        "truncated": (put("truncated", json.dumps(good)[:500]), "not valid JSON"),
        "foreign": (put("foreign", '{"weights": [1, 2]}'), "not an abs-deploy export report"),
        "a list": (put("list", "[1, 2]"), "not an abs-deploy export report"),
        "other format": (put("format", json.dumps({**good, "format": "other/9"})),
                         "report format 'other/9'"),
        "layers not rows": (put("layers", json.dumps(no_layers)), "malformed report"),
        "string for a number": (put("value", json.dumps(bad_value)), "malformed report"),
    }


@pytest.mark.parametrize("kind", ["no such folder", "folder without report", "corrupt",
                                  "truncated", "foreign", "a list", "other format",
                                  "layers not rows", "string for a number"])
def test_bad_input_to_abs_report_is_one_line_and_writes_nothing(kind, tmp_path):
    path, words = _bad_inputs(tmp_path)[kind]
    before = sorted(tmp_path.rglob("*"))
    _one_line_error(CliRunner().invoke(main, ["report", str(path)]), words)
    assert sorted(tmp_path.rglob("*")) == before


def test_abs_report_accepts_the_json_file_itself(tmp_path):
    report.write(_report(), tmp_path)
    (tmp_path / "report.html").unlink()
    result = CliRunner().invoke(main, ["report", str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report.html").is_file() and "report.html" in result.output


def test_abs_report_into_a_read_only_folder_is_one_line_and_changes_nothing(tmp_path,
                                                                          monkeypatch):
    """A read-only file system refuses the new file and, with EROFS, even the clean-up of
    one that was never made; neither may end in a traceback."""
    report.write(_report(), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    unlink = Path.unlink

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def unlink_read_only(path, missing_ok=False):
        if path.exists():  # the probe: our check made it, so let it go
            return unlink(path, missing_ok)
        read_only()  # as Linux does on a read-only mount, even for a missing file
    monkeypatch.setattr(Path, "write_text", read_only)
    monkeypatch.setattr(Path, "unlink", unlink_read_only)
    _one_line_error(CliRunner().invoke(main, ["report", str(tmp_path)]), "Read-only file system")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_abs_report_checks_the_folder_before_rendering(tmp_path, monkeypatch):
    report.write(_report(), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(files, "open", lambda *a: (_ for _ in ()).throw(
        OSError(errno.EROFS, os.strerror(errno.EROFS))), raising=False)
    monkeypatch.setattr(report, "_views", lambda *a: pytest.fail("rendered before the check"))
    _one_line_error(CliRunner().invoke(main, ["report", str(tmp_path)]), "Read-only file system")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# --- in a browser ------------------------------------------------------------------------------


def _browser() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _browser_or_skip() -> str:
    """The browser to render with. CI installs one (.ci/run), so there a missing browser is a
    failure: a skip would let the only check that the page draws its plots vanish unnoticed."""
    found = _browser()
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no Chromium or Chrome was found (tried /usr/bin/chromium, "
                        "chromium, chromium-browser, google-chrome); .ci/run installs Debian's "
                        "chromium before `make test` when it runs as root or with CI=true",
                        pytrace=False)
        pytest.skip("no Chromium or Chrome on this machine")
    return found


@pytest.mark.parametrize("ci, outcome", [("true", pytest.fail.Exception),
                                         (None, pytest.skip.Exception)])
def test_missing_browser_fails_in_ci_and_skips_elsewhere(monkeypatch, ci, outcome):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome):
        _browser_or_skip()


# The plots' fill colours (html_report._CSS): weight bits, activation bits, kept filters,
# compressed BOPs, QCDQ latency.
PLOT_COLOURS = {"weights": (0x4C, 0x78, 0xA8), "activations": (0xF5, 0x85, 0x18),
                "kept": (0x54, 0xA2, 0x4B), "compressed BOPs": (0xE4, 0x57, 0x56)}


def test_page_shows_its_plots_in_headless_chromium(tmp_path):
    from matplotlib.image import imread

    browser = _browser_or_skip()
    page = tmp_path / "report.html"
    page.write_text(render(_report()))
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", "--no-first-run", f"--user-data-dir={tmp_path / 'p'}",
                    f"--screenshot={shot}", "--window-size=1280,2200", page.as_uri()],
                   capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "the browser wrote no screenshot"
    rgb = (imread(shot)[..., :3] * 255).round()
    assert rgb.shape[:2] == (2200, 1280)
    not_white = (rgb < 245).any(axis=2).mean()
    assert not_white > 0.05, f"only {not_white:.1%} of the page is not white"
    for what, colour in PLOT_COLOURS.items():
        share = (abs(rgb - colour) <= 6).all(axis=2).mean()
        assert share > 0.002, f"{what} ({colour}) covers only {share:.3%} of the screenshot"


def test_both_views_say_what_each_parity_check_compares_with_the_end_to_end_logits():
    """The off-mode limit applies to the last segment fed the reference's codes; the file's own
    end-to-end logits difference (here 0.136) must be shown too, in report.md and report.html."""
    rep = _report()
    for text in (render(rep), md_report.markdown(rep)):
        assert "last segment (after the last quantizer) fed the reference" in text
        assert "end to end: logits 1.4e-01 relative" in text
        assert "Fed the reference" in text and "limit 1e-4" in text
