"""``ovlabel report``: the files it writes hold the run's own figures, and the page works in a real headless
browser (Debian's chromium, driven by Playwright): it loads from the folder with no console error, its
images render, and the class filter, the score slider, the pager and the image view change what is shown."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from ovlabel.cli import main
from ovlabel.datasets.shapes import write_coco
from ovlabel.evaluation.coco import evaluate
from ovlabel.export.coco import load_coco

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    gt = write_coco(root / "data", 12, 31337)
    (root / "data" / "images" / "scene_000007.png").unlink()  # a failure the report must list
    assert main(["label", "--coco-gt", str(gt), "--images-dir", str(root / "data" / "images"), "--out",
                 str(root / "run"), "--model", "ovlabel-shapes", "--save-heatmaps", "--no-progress"]) == 0
    assert main(["report", str(root / "run"), "--page-size", "5", "--no-progress"]) == 0
    return root, gt


def summary_of(index: Path) -> dict:
    text = index.read_text(encoding="utf-8")
    return json.loads(re.search(r'<script type="application/json" id="ovlabel-data">(.*?)</script>', text,
                                re.S).group(1))


def test_report_files_hold_the_runs_figures(run):
    root, gt = run
    report = root / "run" / "report"
    s = summary_of(report / "index.html")
    preds = json.loads((root / "run" / "predictions.json").read_text())
    data = json.loads((root / "run" / "dataset.json").read_text())
    assert s["images"] == len(data["images"]) == 11 and s["pages"] == 3  # 11 labelled images, 5 per page
    names = [c["name"] for c in data["categories"]]
    per_class = Counter(names.index(next(c["name"] for c in data["categories"] if c["id"] == p["category_id"]))
                        for p in preds)
    assert s["counts"] == [per_class.get(i, 0) for i in range(len(names))]
    assert [sum(h) for h in s["histograms"]] == s["counts"]
    assert len(s["failures"]) == 1 and "scene_000007.png" in s["failures"][0]["file"]
    # the run's own ground truth is found; its AP is pycocotools' on the run's predictions
    truth = evaluate(load_coco(gt), preds, ("segm", "bbox"))
    assert s["evaluation"]["segm_ap"] == pytest.approx(truth["segm"]["stats"]["AP"])
    # pages hold every image once, each with a thumbnail and, where it has detections, the maps of its best queries
    entries = []
    for n in range(1, 4):
        text = (report / "pages" / f"page-{n:04d}.js").read_text()
        entries += json.loads(re.match(r"window\.ovlabelPage\(\d+, (.*)\);\n$", text, re.S).group(1))
    assert sorted(e["id"] for e in entries) == sorted(i["id"] for i in data["images"])
    assert all((report / e["thumb"]).is_file() for e in entries)
    assert sum(len(e["dets"]) for e in entries) == len(preds)
    assert any(e.get("maps") for e in entries) and all((report / m["src"]).is_file()
                                                       for e in entries for m in e.get("maps", []))
    assert all("t" in d for e in entries for d in e["dets"])  # each detection's outcome at IoU 0.5


def test_report_refuses_an_unfinished_run_and_names_from_files_never_lead_outside(run, tmp_path, capsys):
    root, _ = run
    assert main(["report", str(tmp_path)]) == 2
    assert "has no predictions.json and dataset.json" in capsys.readouterr().err
    # a dataset.json whose file name leads out of the image folder: that image has no thumbnail, says why
    evil = tmp_path / "evil"
    shutil.copytree(root / "run", evil, ignore=shutil.ignore_patterns("report"))
    data = json.loads((evil / "dataset.json").read_text())
    data["images"][0]["file_name"] = "../../../../etc/passwd"
    (evil / "dataset.json").write_text(json.dumps(data))
    assert main(["report", str(evil), "--no-progress"]) == 0
    text = (evil / "report" / "pages" / "page-0001.js").read_text()
    first = json.loads(re.match(r"window\.ovlabelPage\(\d+, (.*)\);\n$", text, re.S).group(1))[0]
    assert "thumb" not in first and "outside" in first["missing"]
    # image ids name the report's files: one that is not an integer is refused before anything is written
    data["images"][0]["id"] = "../../../../tmp/evil"
    (evil / "dataset.json").write_text(json.dumps(data))
    shutil.rmtree(evil / "report")
    capsys.readouterr()
    assert main(["report", str(evil), "--no-progress"]) == 2
    assert "without an integer id" in capsys.readouterr().err and not (evil / "report").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it: apt-get install chromium)")
def test_report_page_in_a_headless_browser(run):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    root, _ = run
    index = root / "run" / "report" / "index.html"
    entries = json.loads(re.match(r"window\.ovlabelPage\(\d+, (.*)\);\n$",
                                  (index.parent / "pages" / "page-0001.js").read_text(), re.S).group(1))
    classes = summary_of(index)["classes"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: errors.append(f"{r.url}: {r.failure}"))
        page.goto(index.as_uri())
        page.wait_for_function("document.querySelectorAll('.card[data-loaded]').length === 5")  # images render
        assert page.evaluate("[...document.querySelectorAll('.card img, .card canvas')].every(c => c.width > 0)")

        def shown() -> int:
            return int(page.inner_text("#shown").split()[0])

        def expected(min_score: float, on: set[int]) -> int:
            return sum(d["s"] >= min_score and d["c"] in on for e in entries for d in e["dets"])

        everything = set(range(len(classes)))
        default = float(page.input_value("#score"))
        assert shown() == expected(default, everything) > 0
        page.fill("#score", "0")
        page.dispatch_event("#score", "input")
        assert shown() == expected(0.0, everything) == sum(len(e["dets"]) for e in entries)
        page.fill("#score", "0.9")
        page.dispatch_event("#score", "input")
        assert shown() == expected(0.9, everything) < expected(0.0, everything)
        page.click("#none")
        assert shown() == 0
        some = next(d["c"] for e in entries for d in e["dets"] if d["s"] >= 0.9)
        page.check(f"input[data-class='{some}']")
        assert shown() == expected(0.9, {some}) > 0
        page.click("#all")
        # per image, false positives and misses follow the filters
        card = page.locator(".card").first
        assert card.get_attribute("data-fp") is not None and card.get_attribute("data-missed") is not None
        # an image opens with the maps of its best queries
        with_maps = next(e for e in entries if e.get("maps"))
        page.click(f".card[data-id='{with_maps['id']}']")
        page.wait_for_function("[...document.querySelectorAll('#modal img')].length > 0 && "
                               "[...document.querySelectorAll('#modal img')].every(i => i.complete && i.naturalWidth)")
        page.click("#modal", position={"x": 2, "y": 2})
        # the next page loads from its own file
        page.click("#next")
        page.wait_for_function("document.getElementById('pageno').textContent.startsWith('page 2 of 3')")
        page.wait_for_function("document.querySelectorAll('.card[data-loaded]').length === 5")
        assert "scene_000007.png" in page.inner_text("#failures")
        assert page.locator("#ap tr").count() > 1 and page.locator("#pr polyline").count() > 0
        browser.close()
    assert errors == []
