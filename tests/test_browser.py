"""The viewer and the report in a real browser (headless Chromium through playwright, offline).

Skipped when playwright or Chromium is missing (``make test`` installs both where it can). Every page is opened with
all requests routed: anything but the page's own file, ``data:``, ``about:`` or ``blob:`` is aborted and fails the
test; so does any console error. With ``TRACE_CIRCUITS_SCREENSHOTS=1`` the tests also write ``docs/viewer.png``,
``docs/viewer_cut.png`` and ``docs/report*.png`` (the README's screenshots).
"""

from __future__ import annotations

import os
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from test_viewer import REAL_CIRCUIT, big_circuit, full_report

from trace_circuits import Circuit
from trace_circuits.circuit import Link, Node

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("TRACE_CIRCUITS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
DOCS = Path(__file__).resolve().parent.parent / "docs"


def _missing() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[browser]')"
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set TRACE_CIRCUITS_CHROMIUM)"
    return ""


if _missing():
    pytest.skip(_missing(), allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Opened:
    """A page opened from a file, with every request and console error recorded."""

    def __init__(self, browser, path: Path, width: int = 1400, height: int = 850, ready: str = "g.node, nav.tc-nav"):
        self.url = path.resolve().as_uri()
        self.context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True)
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(self.url)
        self.page.wait_for_selector(ready)

    def _route(self, route):
        url = route.request.url
        (route.continue_ if self._allowed(url) else route.abort)()

    def _allowed(self, url: str) -> bool:
        return url == self.url or url.split(":", 1)[0] in ("data", "about", "blob")

    def offline_and_clean(self):
        outside = [u for u in self.requests if not self._allowed(u)]
        assert not outside, f"network requests: {outside[:5]}"
        assert not self.errors, f"console errors: {self.errors[:5]}"

    def fresh(self):
        """Reload the page (tests share one page per circuit; each starts from the initial view)."""
        self.page.reload()
        self.page.wait_for_selector("g.node, nav.tc-nav")
        return self.page

    def close(self):
        self.context.close()


def screenshot(page, name: str, **kw):
    """Save ``docs/<name>.png`` when TRACE_CIRCUITS_SCREENSHOTS=1 (the README's pictures come from here)."""
    if os.environ.get("TRACE_CIRCUITS_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        page.screenshot(path=str(DOCS / f"{name}.png"), **kw)


def boxes(page, selector: str, frame=None) -> list[dict]:
    return (frame or page).eval_on_selector_all(selector, """els => els.map(e => {
        const r = e.getBoundingClientRect();
        return {id: e.getAttribute('data-id') || e.textContent, x: r.x, y: r.y, w: r.width, h: r.height};
    })""")


def assert_no_overlap(bs: list[dict], what: str, tol: float = 0.5):
    bs = sorted(bs, key=lambda b: b["x"])
    for i, a in enumerate(bs):
        for b in bs[i + 1:]:
            if b["x"] >= a["x"] + a["w"] - tol:
                break
            if a["y"] < b["y"] + b["h"] - tol and b["y"] < a["y"] + a["h"] - tol:
                raise AssertionError(f"{what} overlap: {a['id']} and {b['id']}")


def js_fmt(v: float) -> str:
    """The viewer's number format: 4 decimals, or 2-digit exponent form for tiny and huge values."""
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e5):
        return re.sub(r"e([+-])0*(\d)", lambda m: "e" + m.group(1) + m.group(2), f"{v:.2e}")
    return f"{v:.4f}"


def expected(c: Circuit, **rule) -> tuple[set, int]:
    """What the viewer should show: :meth:`Circuit.prune` (default: threshold at the smallest |w|)."""
    if not rule:
        rule = {"threshold": min((abs(link.weight) for link in c.links), default=0.0)}
    p = c.prune(**rule)
    return {n.id for n in p.nodes}, len(p.links)


def small_circuit() -> Circuit:
    nodes = [Node("L2.F1", "source", 2, 1, top_tokens=[[" bomb", 4.0]]), Node("L3.H0", "head", 3, 0),
             Node("readout", "readout", 6, label="harmfulness readout")]
    return Circuit(nodes, [Link("L2.F1", "L3.H0", 0.5), Link("L3.H0", "readout", 0.3, "chain"),
                           Link("L2.F1", "readout", -0.1)], {"model": "toy"}).sever(["L2.F1"])


def circuits() -> dict:
    out = {"small": small_circuit(), "synthetic 118 nodes": big_circuit()}
    if REAL_CIRCUIT.exists():
        out["smollm2 default run"] = Circuit.load(REAL_CIRCUIT)
    return out


@pytest.fixture(scope="module", params=list(circuits()))
def viewer(request, browser, tmp_path_factory):
    c = circuits()[request.param]
    path = c.plot().save(tmp_path_factory.mktemp("viewer") / "circuit.html")
    opened = Opened(browser, path)
    yield c, opened
    opened.close()


# -- the viewer ------------------------------------------------------------------------------------------------------


def test_graph_renders_every_node_and_link_without_overlap(viewer):
    c, o = viewer
    ids, n_links = expected(c)
    page = o.page
    assert {b["id"] for b in boxes(page, "g.node")} == ids
    assert page.locator("#tc-svg path.link").count() == n_links
    assert_no_overlap(boxes(page, "g.node"), "node boxes")
    assert_no_overlap(boxes(page, "text.layer-h"), "layer headers")
    labels = page.eval_on_selector_all("g.node", """gs => gs.map(g => {
        const b = g.querySelector('rect.box').getBoundingClientRect(), t = g.querySelector('text.lbl').getBoundingClientRect();
        return t.left >= b.left - 0.5 && t.right <= b.right + 0.5 && t.top >= b.top - 0.5 && t.bottom <= b.bottom + 0.5;
    })""")
    assert all(labels), "every label sits inside its node's box"
    assert_no_overlap(boxes(page, "g.node text.lbl"), "labels")
    assert page.locator("g.node.severed").count() == sum(n.severed for n in c.nodes if n.id in ids)
    assert page.locator("#tc-svg path.link.severed").count() == sum(
        link.severed for link in c.prune(threshold=0.0).links)
    o.offline_and_clean()


def test_clicking_a_node_opens_its_panel(viewer):
    c, o = viewer
    page = o.fresh()
    node = max((n for n in c.nodes if n.kind != "readout"), key=lambda n: (len(n.examples), len(n.scores)))
    page.click(f"g.node[data-id='{node.id}']")
    assert page.locator("#tc-panel").is_visible()
    assert page.get_attribute("#tc-node", "data-id") == node.id
    assert page.locator("#tc-scores tr").count() == len(node.scores) + 1  # + influence
    n_in = sum(link.target == node.id for link in c.links)
    n_out = sum(link.source == node.id for link in c.links)
    assert page.locator("#tc-in tr").count() == (n_in + 1 if n_in else 0)  # + the header row
    assert page.locator("#tc-out tr").count() == n_out + 1
    if node.examples:
        ex = node.examples[0]
        toks = page.locator("#tc-examples .tc-ex").first.locator(".tok")
        assert toks.count() == len(ex["tokens"])
        alpha = [float(s.split(",")[-1].rstrip(")")) for s in toks.evaluate_all(
            "ts => ts.map(t => getComputedStyle(t).backgroundColor)")]
        assert alpha.index(max(alpha)) == ex["acts"].index(max(ex["acts"]))  # the strongest token is the darkest
    first_out = page.locator("#tc-out a.tc-node-link").first
    target = first_out.text_content()
    first_out.click()
    assert page.get_attribute("#tc-node", "data-id") == target
    page.keyboard.press("Escape")
    assert not page.locator("#tc-panel").is_visible()
    o.offline_and_clean()


def set_range(page, selector: str, value) -> None:
    page.eval_on_selector(selector, "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", str(value))


def test_sliders_prune_like_circuit_prune(viewer):
    c, o = viewer
    page = o.fresh()
    for cum in (0.5, 0.8, 0.95):
        set_range(page, "#tc-cum", cum)
        ids, n_links = expected(c, cumulative=cum)
        shown = page.evaluate("tcViewer.shown()")
        assert set(shown["nodes"]) == ids and len(shown["links"]) == n_links, cum
        assert {b["id"] for b in boxes(page, "g.node")} == ids
        assert_no_overlap(boxes(page, "g.node"), f"node boxes at cumulative {cum}")
    set_range(page, "#tc-cum", 1)
    thresholds = page.evaluate("tcViewer.thresholds")
    for i in (len(thresholds) // 3, 2 * len(thresholds) // 3, len(thresholds) - 1):
        set_range(page, "#tc-thr", i)
        ids, n_links = expected(c, threshold=thresholds[i])
        assert {b["id"] for b in boxes(page, "g.node")} == ids and page.locator("#tc-svg path.link").count() == n_links
    set_range(page, "#tc-thr", 0)
    o.offline_and_clean()


def test_cut_toggle_removes_severed_links(viewer):
    c, o = viewer
    page = o.fresh()
    ids, n_links = expected(c)
    pruned = c.prune(threshold=0.0)
    page.check("#tc-cut")
    assert page.locator("#tc-svg path.link.severed").count() == 0
    assert page.locator("#tc-svg path.link").count() == sum(not link.severed for link in pruned.links)
    assert page.locator("g.node.ghost").count() == sum(n.severed for n in pruned.nodes)
    status = page.text_content("#tc-status")
    assert "cut applied" in status
    if all(n.severed for n in pruned.nodes if n.kind == "source"):  # every traced path starts at a cut source
        assert status.rstrip().endswith("→ 0") and page.locator("#tc-banner").is_visible()
        assert page.locator("#tc-svg path.link.dead").count() == page.locator("#tc-svg path.link").count()
    page.uncheck("#tc-cut")
    assert page.locator("#tc-svg path.link").count() == n_links
    o.offline_and_clean()


def test_hovering_a_link_shows_its_weight(viewer):
    c, o = viewer
    page = o.fresh()
    point = page.evaluate("""() => {
        for (const p of document.querySelectorAll('path.hit')) {
            const len = p.getTotalLength();
            for (const f of [0.5, 0.35, 0.65, 0.2, 0.8]) {
                const q = p.getPointAtLength(len * f).matrixTransform(p.getScreenCTM());
                if (document.elementFromPoint(q.x, q.y) === p) return {x: q.x, y: q.y, i: +p.getAttribute('data-i')};
            }
        }
        return null;
    }""")
    assert point is not None, "some link can be hovered"
    page.mouse.move(point["x"], point["y"])
    link = c.links[point["i"]]
    tip = page.locator("#tc-tip")
    assert tip.is_visible()
    text = tip.text_content()
    assert f"{link.source} → {link.target}" in text
    assert f"weight {'+' if link.weight >= 0 else ''}{js_fmt(link.weight)}" in text, text
    o.offline_and_clean()


def test_search_pin_and_export(viewer, tmp_path):
    c, o = viewer
    page = o.fresh()
    worded = [n for n in c.nodes if n.top_tokens and str(n.top_tokens[0][0]).strip().isalpha()]
    target = (worded or c.nodes)[0]
    page.fill("#tc-search", target.id)
    page.press("#tc-search", "Enter")
    assert page.get_attribute("#tc-node", "data-id") == target.id
    if target.top_tokens:
        token = str(target.top_tokens[0][0]).strip()
        page.fill("#tc-search", token)
        want = {n.id for n in c.prune(threshold=min(abs(lk.weight) for lk in c.links)).nodes
                if token.lower() in n.id.lower() or token.lower() in n.label.lower()
                or any(token.lower() in str(t[0]).lower() for t in n.top_tokens)} - {target.id}
        assert {b["id"] for b in boxes(page, "g.node.match")} == want
    page.fill("#tc-search", "")
    page.keyboard.press("Escape")
    page.click("#tc-fit")
    left = sorted(boxes(page, "g.node"), key=lambda b: (b["x"], b["y"]))
    others = [b["id"] for b in left if b["id"] != target.id][:2]
    for nid in others:
        page.click(f"g.node[data-id='{nid}']", modifiers=["Shift"])
    assert page.locator("#tc-compare th a.tc-node-link[data-goto]").count() == len(others)
    with page.expect_download() as dl:
        page.click("#tc-svg-btn")
    svg = Path(dl.value.path()).read_text()
    root = ET.fromstring(svg)
    nodes = [g for g in root.iter("{http://www.w3.org/2000/svg}g") if "node" in (g.get("class") or "").split()]
    assert len(nodes) == page.locator("g.node").count() and "<style" in svg and "path class=\"hit\"" not in svg
    with page.expect_download() as dl:
        page.click("#tc-png-btn")
    assert Path(dl.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    o.offline_and_clean()


def test_screenshot_of_the_real_circuit(browser, tmp_path):
    if not REAL_CIRCUIT.exists():
        pytest.skip("tests/data/circuit_smollm2.json not present")
    c = Circuit.load(REAL_CIRCUIT)
    o = Opened(browser, c.plot().save(tmp_path / "circuit.html"), 1400, 760)
    worded = [n for n in c.nodes if n.kind == "feature" and str(n.top_tokens[0][0]).strip().isalpha()]
    best = max(worded, key=lambda n: n.scores.get("readout_effect") or 0)
    o.page.click(f"g.node[data-id='{best.id}']")
    assert o.page.get_attribute("#tc-node", "data-id") == best.id
    panel_left = o.page.locator("#tc-panel").bounding_box()["x"]
    assert all(b["x"] + b["w"] <= panel_left for b in boxes(o.page, "g.node")), "the graph refits beside the panel"
    o.page.mouse.move(5, 300)
    screenshot(o.page, "viewer")
    o.page.keyboard.press("Escape")
    o.page.check("#tc-cut")
    screenshot(o.page, "viewer_cut")
    o.offline_and_clean()
    o.close()


def test_viewer_renders_inside_a_notebook_iframe(browser, tmp_path):
    c = big_circuit()
    path = tmp_path / "notebook.html"
    path.write_text(f"<!doctype html><html><body><h1>cell output</h1>{c.plot()._repr_html_()}</body></html>")
    o = Opened(browser, path, ready="iframe")
    frame = o.page.frame_locator("iframe.tc-viewer-frame")
    frame.locator("g.node").first.wait_for()
    assert frame.locator("g.node").count() == len(expected(c)[0])
    o.offline_and_clean()
    o.close()


# -- the report ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(browser, tmp_path_factory):
    path = full_report(tmp_path_factory.mktemp("report"))
    opened = Opened(browser, path, 1280, 900)
    yield path, opened
    opened.close()


def test_report_navigation_summary_and_plots(report):
    path, o = report
    page = o.page
    screenshot(page, "report")
    hrefs = page.eval_on_selector_all("nav.tc-nav a", "as => as.map(a => a.getAttribute('href'))")
    assert len(hrefs) >= 8
    for href in hrefs:
        assert page.locator(href).count() == 1, href
    page.click("nav.tc-nav a[href='#evaluation']")
    page.wait_for_function("Math.abs(document.getElementById('evaluation').getBoundingClientRect().top) < 80")
    assert page.locator("#summary .tc-fact").count() >= 8
    assert page.locator(".plotly-graph-div .main-svg").count() >= 4  # divergence, features, hook set, trade-off
    width = page.evaluate("document.querySelector('.tc-report-body').clientWidth")
    wide = page.eval_on_selector_all("table.tc-table", f"ts => ts.filter(t => t.offsetWidth > {width}).length")
    assert wide == 0, "every table fits the page"
    frame = page.frame_locator("iframe.tc-frame")
    assert frame.locator("g.node").count() == len(expected(big_circuit())[0])
    o.offline_and_clean()


def test_report_response_browser_filters(report):
    from test_viewer import synthetic_evaluation

    ev = synthetic_evaluation()
    path, o = report
    page = o.page
    cards = page.locator("#tc-responses .tc-card")
    n_groups = len({(r["kind"], r["template"], r["prompt"]) for r in ev.responses})
    assert f"{n_groups} of {n_groups}" in page.text_content("#tc-responses .tc-count")
    page.select_option("#tc-responses select[name=template]", "multi_turn")
    assert cards.count() == ev.params["n_harmful"]
    assert set(cards.evaluate_all("cs => cs.map(c => c.dataset.template)")) == {"multi_turn"}
    page.select_option("#tc-responses select[name=verdict]", "not_defended")
    want = sum(r["defense"] == "tracerouter" and r["template"] == "multi_turn" and not r["defended"]
               for r in ev.responses)
    assert cards.count() == want
    page.select_option("#tc-responses select[name=after]", "new_idea")
    want = sum(r["defense"] == "new_idea" and r["template"] == "multi_turn" and not r["defended"]
               for r in ev.responses)
    assert cards.count() == want
    if want:
        assert "after: new_idea" in cards.first.text_content()
    page.select_option("#tc-responses select[name=verdict]", "")
    page.select_option("#tc-responses select[name=template]", "")
    page.fill("#tc-responses input[name=q]", "benign question 2")
    assert cards.count() == 1 and "before: no defense" in cards.first.text_content()
    page.fill("#tc-responses input[name=q]", "")
    page.evaluate("document.getElementById('responses').scrollIntoView()")
    screenshot(page, "report_responses")
    o.offline_and_clean()


def test_report_of_the_real_circuit_screenshot(browser, tmp_path):
    """The README's report screenshots, from a real run folder: TRACE_CIRCUITS_RUN=runs/latest."""
    if os.environ.get("TRACE_CIRCUITS_SCREENSHOTS") != "1":
        pytest.skip("only writes screenshots")
    run = os.environ.get("TRACE_CIRCUITS_RUN")
    if not run:
        pytest.skip("set TRACE_CIRCUITS_RUN to a run folder to screenshot its report")
    o = Opened(browser, Path(run) / "report.html", 1280, 900)
    screenshot(o.page, "report")
    o.page.evaluate("document.getElementById('responses').scrollIntoView()")
    screenshot(o.page, "report_responses")
    o.offline_and_clean()
    o.close()
