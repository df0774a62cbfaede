"""`bench gdc` against a local fake of the GDC API the test writes (127.0.0.1): no network."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from bench.cli.main import main
from bench.common.errors import DataError
from bench.data.cohort import load_cohort
from bench.data.gdc import (MANIFEST_COLUMNS, GdcClient, GdcError, GdcFile, download_files, download_one,
                            fetch_cohort, manifest_text, project_labels, survival_labels)


def _hit(i: int, project: str, data: bytes, *, vital="Alive", death=None, follow=(300.0,), name=None) -> dict:
    case = f"TCGA-{project[-2:]}-{i:04d}"
    return {
        "file_id": f"00000000-0000-4000-8000-{i:012d}",
        "file_name": name or f"{case}-01Z-00-DX1.{i:08X}-AAAA-BBBB-CCCC-DDDDDDDDDDDD.svs",
        "md5sum": hashlib.md5(data).hexdigest(), "file_size": len(data), "state": "released",
        "cases": [{"submitter_id": case, "project": {"project_id": project},
                   "demographic": {"vital_status": vital, "days_to_death": death},
                   "diagnoses": [{"days_to_last_follow_up": f} for f in follow]}],
    }


class FakeGdc:
    """Files endpoint (filters, paging) and data endpoint (Range) of the GDC API, with planted faults."""

    def __init__(self) -> None:
        self.hits: list[dict] = []
        self.blobs: dict[str, bytes] = {}
        self.requests: list[dict] = []
        self.files_status: int | None = None  # answer the files endpoint with this error status
        self.files_body: bytes | None = None  # ... or with these bytes
        self.short_total = 0  # report this many more files than exist (a truncated listing)
        self.cut: dict[str, int] = {}  # file id -> bytes sent before the connection drops (once)
        self.corrupt: set[str] = set()
        self.ignore_range = False

    def add(self, hit: dict, data: bytes) -> None:
        self.hits.append(hit)
        self.blobs[hit["file_id"]] = data

    def handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "body": body})
                if fake.files_status:
                    return self._send(fake.files_status, json.dumps({"message": "planted failure"}).encode())
                if fake.files_body is not None:
                    return self._send(200, fake.files_body)
                hits = fake.hits
                for f in body["filters"]["content"]:
                    field, values = f["content"]["field"], f["content"]["value"]
                    if field == "file_name":
                        hits = [h for h in hits if h["file_name"] in values]
                    elif field == "cases.project.project_id":
                        hits = [h for h in hits if h["cases"][0]["project"]["project_id"] in values]
                hits = sorted(hits, key=lambda h: h["file_name"])
                start, size = body["from"], body["size"]
                page = hits[start:start + size]
                out = {"data": {"hits": page, "pagination": {"total": len(hits) + fake.short_total, "from": start,
                                                             "size": size, "count": len(page)}}, "warnings": {}}
                self._send(200, json.dumps(out).encode())

            def do_GET(self):
                file_id = self.path.rsplit("/", 1)[-1]
                fake.requests.append({"path": self.path, "range": self.headers.get("Range")})
                data = fake.blobs.get(file_id)
                if data is None:
                    return self._send(404, b'{"message": "no such file"}')
                if file_id in fake.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                start = 0
                rng = self.headers.get("Range")
                if rng and not fake.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if file_id in fake.cut:
                    self.wfile.write(data[start:start + fake.cut.pop(file_id)])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

            def _send(self, status, payload):
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler


@pytest.fixture
def gdc():
    fake = FakeGdc()
    server = ThreadingHTTPServer(("127.0.0.1", 0), fake.handler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    fake.client = GdcClient(fake.url, timeout=10)
    yield fake
    server.shutdown()
    server.server_close()


def _blob(i: int, n: int = 5000) -> bytes:
    return bytes((i * 31 + k * 7) % 251 for k in range(n))


def test_manifest_reads_as_gdc_client_reads_it():
    files = [GdcFile("id-2", "B.svs", "b" * 32, 20, "released", "P2", "TCGA-LUSC"),
             GdcFile("id-1", "A.svs", "a" * 32, 10, "released", "P1", "TCGA-LUAD")]
    text = manifest_text(files)
    assert text.splitlines()[0] == "\t".join(MANIFEST_COLUMNS) == "id\tfilename\tmd5\tsize\tstate"
    # gdc-client's parcel.manifest.parse: csv.DictReader, tab delimiter, '#' as quote char; it needs `id`
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t", quotechar="#"))
    assert [(r["id"], r["filename"], r["md5"], r["size"], r["state"]) for r in rows] == [
        ("id-1", "A.svs", "a" * 32, "10", "released"), ("id-2", "B.svs", "b" * 32, "20", "released")]
    with pytest.raises(GdcError, match="'#'"):
        manifest_text([GdcFile("id", "A#1.svs", "a" * 32, 1, "released", "P", "TCGA-X")])


def test_query_pages_and_filters(gdc):
    for i in range(5):
        gdc.add(_hit(i, "TCGA-LUAD" if i % 2 else "TCGA-LUSC", _blob(i, 10)), _blob(i, 10))
    gdc.add(_hit(9, "TCGA-BRCA", b"x"), b"x")
    files = gdc.client.slide_files(projects=["TCGA-LUAD", "TCGA-LUSC"], page=2)
    assert len(files) == 5 and [f.file_name for f in files] == sorted(f.file_name for f in files)
    posts = [r for r in gdc.requests if r["path"] == "/files"]
    assert [r["body"]["from"] for r in posts] == [0, 2, 4]
    filters = {f["content"]["field"]: f["content"]["value"] for f in posts[0]["body"]["filters"]["content"]}
    assert filters["data_type"] == ["Slide Image"] and filters["experimental_strategy"] == ["Diagnostic Slide"]
    assert filters["cases.project.project_id"] == ["TCGA-LUAD", "TCGA-LUSC"]
    assert {"file_id", "file_name", "md5sum", "file_size", "cases.demographic.vital_status"} <= set(
        posts[0]["body"]["fields"].split(","))
    # file names go in batches of one page each
    gdc.requests.clear()
    names = [h["file_name"] for h in gdc.hits[:3]] + [f"NOT-ON-GDC-{k}.svs" for k in range(4)]
    got = gdc.client.slide_files(projects=["TCGA-LUAD", "TCGA-LUSC"], file_names=names, page=3)
    assert sorted(f.file_name for f in got) == sorted(names[:3]) and len(gdc.requests) >= 3


def test_error_responses_are_clear(gdc):
    gdc.add(_hit(1, "TCGA-LUAD", b"abc"), b"abc")
    gdc.files_status = 500
    with pytest.raises(GdcError, match=r"HTTP 500.*planted failure"):
        gdc.client.slide_files(projects=["TCGA-LUAD"])
    gdc.files_status = None
    gdc.files_body = b'{"data": {"hits": [{"file_id": "x", "file_na'
    with pytest.raises(GdcError, match="not valid JSON.*truncated"):
        gdc.client.slide_files(projects=["TCGA-LUAD"])
    gdc.files_body = b'{"message": "bad filter"}'
    with pytest.raises(GdcError, match="no data.hits.*bad filter"):
        gdc.client.slide_files(projects=["TCGA-LUAD"])
    gdc.files_body = None
    gdc.short_total = 3
    with pytest.raises(GdcError, match="listing truncated: got 1 of the 4"):
        gdc.client.slide_files(projects=["TCGA-LUAD"])
    with pytest.raises(GdcError, match="cannot reach the GDC API"):
        GdcClient("http://127.0.0.1:9", timeout=2).slide_files(projects=["TCGA-LUAD"])


def test_download_resumes_checks_md5_and_never_leaves_a_partial_slide(gdc, tmp_path):
    data = _blob(3, 200_000)
    gdc.add(_hit(3, "TCGA-LUAD", data), data)
    (f,) = gdc.client.slide_files(projects=["TCGA-LUAD"])
    slides = tmp_path / "slides"
    slides.mkdir()
    gdc.cut[f.file_id] = 70_000
    with pytest.raises(GdcError, match=rf"{f.file_name}.*stopped at .* \(70000 of 200000 bytes\).*rerun to resume"):
        download_one(gdc.client, f, slides)
    assert not (slides / f.file_name).exists()  # nothing carries the slide's name
    assert (slides / f"{f.file_name}.part").stat().st_size == 70_000
    got = download_one(gdc.client, f, slides)
    assert got == 130_000 and gdc.requests[-1]["range"] == "bytes=70000-"
    assert (slides / f.file_name).read_bytes() == data and not (slides / f"{f.file_name}.part").exists()
    # already whole: nothing fetched
    report = download_files(gdc.client, [f], slides)
    assert report.done == [f.file_name] and report.new == [] and report.bytes_fetched == 0
    # a cut transfer is retried at once, resuming: one call gets the whole slide
    (slides / f.file_name).unlink()
    gdc.cut[f.file_id] = 50_000
    report = download_files(gdc.client, [f], slides, retries=1, wait=0)
    assert report.new == [f.file_name] and report.bytes_fetched == 200_000 and report.failed == []
    assert gdc.requests[-1]["range"] == "bytes=50000-" and (slides / f.file_name).read_bytes() == data


def test_md5_mismatch_and_ignored_range(gdc, tmp_path):
    a, b = _blob(1, 50_000), _blob(2, 60_000)
    gdc.add(_hit(1, "TCGA-LUAD", a), a)
    gdc.add(_hit(2, "TCGA-LUAD", b), b)
    fa, fb = gdc.client.slide_files(projects=["TCGA-LUAD"])
    slides = tmp_path / "slides"
    gdc.corrupt.add(fa.file_id)
    gdc.cut[fb.file_id] = 10_000
    report = download_files(gdc.client, [fa, fb], slides, check_space=False, retries=0)
    assert report.new == [] and [n for n, _ in report.failed] == [fa.file_name, fb.file_name]
    assert f"md5 of {fa.file_name}" in report.failed[0][1] and "deleted" in report.failed[0][1]
    assert not (slides / f"{fa.file_name}.part").exists() and not (slides / fa.file_name).exists()
    gdc.corrupt.clear()
    gdc.ignore_range = True  # a server that answers 200 to a Range request: the part starts over
    report = download_files(gdc.client, [fa, fb], slides, retries=0)
    assert sorted(report.new) == sorted([fa.file_name, fb.file_name]) and report.failed == []
    assert (slides / fa.file_name).read_bytes() == a and (slides / fb.file_name).read_bytes() == b
    # a file of that name that is not the GDC's is never overwritten
    (slides / fa.file_name).write_bytes(b"mine")
    report = download_files(gdc.client, [fa], slides)
    assert "move it away" in report.failed[0][1] and (slides / fa.file_name).read_bytes() == b"mine"


def test_labels_from_gdc_fields():
    files = [
        GdcFile("1", "S1.svs", "m", 1, "released", "P1", "TCGA-LUAD", "Dead", 400.0, 100.0),
        GdcFile("2", "S2.svs", "m", 1, "released", "P2", "TCGA-LUSC", "Alive", None, 900.0),
        GdcFile("3", "S3.svs", "m", 1, "released", "P3", "TCGA-LUSC", "Dead", None, 50.0),
        GdcFile("4", "S4.svs", "m", 1, "released", "P2", "TCGA-LUSC", "Alive", None, 900.0),
        GdcFile("5", "S5.svs", "m", 1, "released", "P5", "TCGA-LUAD", "Not Reported", None, None),
    ]
    labels = project_labels(files, ["LUAD", "LUSC"])
    assert dict(zip(labels["slide_id"], labels["label"])) == {"S1": "LUAD", "S2": "LUSC", "S3": "LUSC",
                                                              "S4": "LUSC", "S5": "LUAD"}
    with pytest.raises(DataError, match="not among the classes"):
        project_labels(files, ["LUAD"])
    surv, left = survival_labels(files)
    assert surv.to_dict("list") == {"slide_id": ["S1", "S2", "S4"], "patient_id": ["P1", "P2", "P2"],
                                    "time": [400.0, 900.0, 900.0], "event": [1, 0, 0]}
    assert left == [("P3", "dead without days_to_death"), ("P5", "vital status 'Not Reported'")]


SUITE = """
name = "tiny"
[[datasets]]
name = "tcga-nsclc"
task = "classification"
classes = ["LUAD", "LUSC"]
data = "TCGA-NSCLC"
[[datasets]]
name = "tcga-luad-surv"
task = "survival"
data = "TCGA-LUAD"
labels = "survival.csv"
[[methods]]
paradigm = "two-stage"
encoder = "resnet18-trunc"
aggregator = "abmil"
"""


def test_bench_gdc_writes_manifest_slides_and_labels(gdc, tmp_path, capsys):
    for i in range(6):
        data = _blob(i, 3000 + i)
        project = "TCGA-LUAD" if i < 4 else "TCGA-LUSC"
        gdc.add(_hit(i, project, data, vital="Dead" if i == 1 else "Alive", death=250.0 if i == 1 else None), data)
    suite = tmp_path / "tiny.toml"
    suite.write_text(SUITE)
    root = tmp_path / "root"
    gdc.cut[gdc.hits[2]["file_id"]] = 100
    assert main(["gdc", "--suite", str(suite), "--data-root", str(root), "--api", gdc.url, "--download",
                 "--retries", "0"]) == 1
    assert "rerun the same command to resume" in capsys.readouterr().err
    nsclc = load_cohort(root / "TCGA-NSCLC", task="classification", classes=["LUAD", "LUSC"])
    assert len(nsclc) == 5  # the cut slide has no labels row yet
    assert main(["gdc", "--suite", str(suite), "--data-root", str(root), "--api", gdc.url, "--download"]) == 0
    nsclc = load_cohort(root / "TCGA-NSCLC", task="classification", classes=["LUAD", "LUSC"])
    assert len(nsclc) == 6 and nsclc.table["label_name"].value_counts().to_dict() == {"LUAD": 4, "LUSC": 2}
    manifest = list(csv.DictReader(open(root / "TCGA-NSCLC" / "gdc_manifest.tcga-nsclc.txt"), delimiter="\t",
                                   quotechar="#"))
    assert {r["id"] for r in manifest} == {h["file_id"] for h in gdc.hits}
    assert all(r["md5"] == hashlib.md5((root / "TCGA-NSCLC" / "slides" / r["filename"]).read_bytes()).hexdigest()
               for r in manifest)
    surv = load_cohort(root / "TCGA-LUAD", labels="survival.csv", task="survival")
    assert len(surv) == 4 and dict(zip(surv.table["patient_id"], surv.table["event"]))["TCGA-AD-0001"] == 1
    # offline rerun from the saved listing: same labels, no request
    n = len(gdc.requests)
    assert main(["gdc", "--suite", str(suite), "--data-root", str(root), "--offline"]) == 0
    assert len(gdc.requests) == n
    # a labels file the user wrote is never overwritten
    (root / "TCGA-LUAD" / "survival.csv").write_text("slide_id,patient_id,time,event\n")
    assert main(["gdc", "--suite", str(suite), "--data-root", str(root), "--offline"]) == 2
    assert (root / "TCGA-LUAD" / "survival.csv").read_text() == "slide_id,patient_id,time,event\n"


def test_gdc_client_layout_and_paper_split_names(gdc, tmp_path):
    from bench.data.paper import paper_labels

    shipped = paper_labels("abmilx-tcga-brca-subtyping")
    for i, sid in enumerate(shipped["slide_id"].iloc[:3]):
        data = _blob(i, 1000)
        gdc.add(_hit(i, "TCGA-BRCA", data, name=f"{sid}.svs"), data)
    folder = tmp_path / "TCGA-BRCA"
    out = fetch_cohort(folder, "tcga-brca", task="classification", classes=["IDC", "ILC"],
                       paper_source="abmilx-tcga-brca-subtyping", projects=["TCGA-BRCA"], client=gdc.client)
    posts = [r for r in gdc.requests if r["path"] == "/files"]
    assert len(posts) == 2  # 985 file names in pages of 500
    assert out.listed == 3 and len(out.not_on_gdc) == 982 and out.present == 0
    # gdc-client's layout: slides/<file id>/<file name>
    h = gdc.hits[0]
    (folder / "slides" / h["file_id"]).mkdir()
    (folder / "slides" / h["file_id"] / h["file_name"]).write_bytes(gdc.blobs[h["file_id"]])
    out = fetch_cohort(folder, "tcga-brca", task="classification", classes=["IDC", "ILC"],
                       paper_source="abmilx-tcga-brca-subtyping", projects=["TCGA-BRCA"], offline=True)
    labels = pd.read_csv(out.labels)
    assert labels["filename"].tolist() == [f"{h['file_id']}/{h['file_name']}"]
    assert labels["label"].tolist() == [shipped.set_index("slide_id").loc[h["file_name"][:-4], "label"]]
    cohort = load_cohort(folder, task="classification", classes=["IDC", "ILC"])
    assert Path(cohort.table["path"].iloc[0]).read_bytes() == gdc.blobs[h["file_id"]]


def test_panda_labels_from_the_shipped_split(tmp_path):
    from bench.data.paper import paper_labels

    ids = paper_labels("abmilx-panda")["slide_id"].iloc[:4].tolist()
    (tmp_path / "PANDA" / "slides").mkdir(parents=True)
    for sid in ids:
        (tmp_path / "PANDA" / "slides" / f"{sid}.tiff").write_bytes(b"")
    out = fetch_cohort(tmp_path / "PANDA", "panda", task="grading", paper_source="abmilx-panda")
    assert out.present == 4 and out.listed == 10202 and out.manifest is None
    cohort = load_cohort(tmp_path / "PANDA", task="grading", classes=[str(g) for g in range(6)])
    assert sorted(cohort.slide_ids) == sorted(ids)
