"""TCGA diagnostic slides and their labels from the NCI Genomic Data Commons (GDC) API.

Three things, standard library HTTP only (urllib):

- **Query** the `files` endpoint for open diagnostic slides (`data_type` "Slide
  Image", `experimental_strategy` "Diagnostic Slide") of some projects, or with
  the given file names (the slides of a shipped paper split), with the case
  fields labels need (project, vital status, days to death / last follow-up).
  Pages of `PAGE` hits are fetched until the reported total is reached; an
  error status, a body that is not the JSON the API documents, or fewer hits
  than the total is a GdcError naming the request.
- **Manifest** for the GDC Data Transfer Tool: tab-separated with the header
  `id filename md5 size state` (the columns of the API's manifest endpoint;
  gdc-client reads it with csv.DictReader, tab delimiter, '#' as quote char, and
  requires `id`).
- **Download** (`download_files`) over the `data/<file_id>` endpoint into the
  slide folder: the bytes go to `<file name>.part`; a rerun resumes it with an
  HTTP Range request (a server that answers 200 instead of 206 restarts it);
  the size and md5 are checked before the part is renamed to the slide's name,
  so no partial slide ever carries a slide's name. A cut transfer keeps the part
  for the rerun; an md5 mismatch deletes it (the next run fetches it again).

Labels from GDC fields (`project_labels`, `survival_labels`): slide id = file
name without `.svs`, patient id = the case's submitter id (TCGA-XX-XXXX);
survival time in days: days_to_death for a dead patient, else the largest
days_to_last_follow_up / days_to_follow_up; patients without a usable time are
left out and listed.

Example:
    >>> client = GdcClient()                                               # doctest: +SKIP
    >>> files = client.slide_files(projects=["TCGA-LUAD", "TCGA-LUSC"])    # doctest: +SKIP
    >>> write_manifest(files, "gdc_manifest.txt")                          # doctest: +SKIP
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import json
import math
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common.console import info, progress
from bench.common.errors import DataError
from bench.common.files import write_text_atomic

if TYPE_CHECKING:
    import pandas as pd

API = "https://api.gdc.cancer.gov"
PAGE = 500  # hits per files request (and file names per filter)
CHUNK = 1 << 20
MANIFEST_COLUMNS = ("id", "filename", "md5", "size", "state")
FIELDS = (
    "file_id", "file_name", "md5sum", "file_size", "state", "cases.submitter_id", "cases.project.project_id",
    "cases.demographic.vital_status", "cases.demographic.days_to_death", "cases.diagnoses.days_to_last_follow_up",
    "cases.follow_ups.days_to_follow_up",
)
PART_SUFFIX = ".part"


class GdcError(DataError):
    """The GDC answered with an error, something unreadable, or a file that does not check out."""


@dataclass(frozen=True)
class GdcFile:
    """One slide file as the GDC lists it, with the case fields labels need."""

    file_id: str
    file_name: str
    md5: str
    size: int
    state: str
    case: str
    project: str
    vital_status: str | None = None
    days_to_death: float | None = None
    days_to_last_follow_up: float | None = None

    @property
    def slide_id(self) -> str:
        return self.file_name.rsplit(".", 1)[0] if self.file_name.lower().endswith(".svs") else self.file_name


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


# --- queries ------------------------------------------------------------------------------------


def _in(field: str, values: Sequence[str]) -> dict[str, Any]:
    return {"op": "in", "content": {"field": field, "value": list(values)}}


def slide_filters(*, projects: Sequence[str] | None = None, file_names: Sequence[str] | None = None) -> dict:
    """GDC filter for open diagnostic slides of some projects and/or with some file names."""
    parts = [_in("data_type", ["Slide Image"]), _in("experimental_strategy", ["Diagnostic Slide"]),
             _in("access", ["open"])]
    if projects:
        parts.append(_in("cases.project.project_id", projects))
    if file_names:
        parts.append(_in("file_name", file_names))
    return {"op": "and", "content": parts}


def _number(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _parse_hit(hit: Any, where: str) -> GdcFile:
    if not isinstance(hit, Mapping):
        raise GdcError(f"{where}: a hit is not a JSON object: {str(hit)[:80]}")
    missing = [k for k in ("file_id", "file_name", "md5sum", "file_size") if hit.get(k) in (None, "")]
    if missing:
        raise GdcError(f"{where}: file {hit.get('file_id') or hit.get('file_name') or '?'} lacks {', '.join(missing)}")
    cases = hit.get("cases") or []
    if len(cases) != 1 or not isinstance(cases[0], Mapping):
        raise GdcError(f"{where}: file {hit['file_name']} belongs to {len(cases)} cases; a diagnostic slide has one")
    case = cases[0]
    demo = case.get("demographic") or {}
    follow = [_number(d.get("days_to_last_follow_up")) for d in case.get("diagnoses") or [] if isinstance(d, Mapping)]
    follow += [_number(d.get("days_to_follow_up")) for d in case.get("follow_ups") or [] if isinstance(d, Mapping)]
    follow = [f for f in follow if f is not None]
    try:
        size = int(hit["file_size"])
    except (TypeError, ValueError):
        raise GdcError(f"{where}: file {hit['file_name']} has file_size {hit['file_size']!r}") from None
    return GdcFile(
        file_id=str(hit["file_id"]), file_name=str(hit["file_name"]), md5=str(hit["md5sum"]).lower(), size=size,
        state=str(hit.get("state") or "released"), case=str(case.get("submitter_id") or ""),
        project=str((case.get("project") or {}).get("project_id") or ""),
        vital_status=demo.get("vital_status"), days_to_death=_number(demo.get("days_to_death")),
        days_to_last_follow_up=max(follow) if follow else None,
    )


class GdcClient:
    """The few GDC API calls the harness makes.

    Args:
        api: base URL (tests point it at a local server).
        timeout: seconds per connection attempt and read.
        opener: `urllib.request.OpenerDirector` to use (default: urllib's).
    """

    def __init__(self, api: str = API, *, timeout: float = 60.0,
                 opener: urllib.request.OpenerDirector | None = None) -> None:
        self.api = api.rstrip("/")
        self.timeout = timeout
        self._open = (opener or urllib.request.build_opener()).open

    def open(self, path: str, *, body: Any = None, headers: Mapping[str, str] | None = None) -> Any:
        """The HTTP response of GET (or POST with a JSON `body`); an error status is a GdcError."""
        url = f"{self.api}/{path.lstrip('/')}"
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                     headers={**({"Content-Type": "application/json"} if data else {}),
                                              **(headers or {})})
        try:
            return self._open(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc)
            exc.close()
            raise GdcError(f"GDC API {req.method} {url} answered HTTP {exc.code} {exc.reason}"
                           + (f": {detail}" if detail else "")) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise GdcError(f"cannot reach the GDC API at {url} ({reason}); check the network, or write the "
                           "manifest elsewhere and copy it here") from None

    def post_json(self, path: str, body: Any) -> dict[str, Any]:
        where = f"GDC API POST {self.api}/{path}"
        with self.open(path, body=body) as resp:
            try:
                raw = resp.read()
            except (http.client.IncompleteRead, OSError) as exc:
                raise GdcError(f"{where}: the response was cut off ({type(exc).__name__}); rerun") from None
        try:
            out = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise GdcError(f"{where}: the response is not valid JSON ({exc}; {len(raw)} bytes, starting "
                           f"{raw[:60]!r}); it may be truncated: rerun") from None
        if not isinstance(out, dict):
            raise GdcError(f"{where}: expected a JSON object, got {type(out).__name__}")
        return out

    def slide_files(self, *, projects: Sequence[str] | None = None,
                    file_names: Sequence[str] | None = None, page: int = PAGE) -> list[GdcFile]:
        """Every open diagnostic slide of `projects` or with `file_names` (sorted by file name)."""
        if not projects and not file_names:
            raise DataError("give GDC projects or file names to look up")
        batches = [None] if not file_names else [list(file_names)[i:i + page]
                                                 for i in range(0, len(file_names), page)]
        out: dict[str, GdcFile] = {}
        for names in batches:
            for f in self._all_pages(slide_filters(projects=projects, file_names=names), page):
                out[f.file_id] = f
        return sorted(out.values(), key=lambda f: (f.file_name, f.file_id))

    def _all_pages(self, filters: dict, page: int) -> list[GdcFile]:
        files: list[GdcFile] = []
        total = None
        while total is None or len(files) < total:
            body = {"filters": filters, "fields": ",".join(FIELDS), "format": "JSON", "size": page,
                    "from": len(files), "sort": "file_name:asc"}
            where = f"GDC API files (from {len(files)})"
            out = self.post_json("files", body)
            data = out.get("data")
            if not isinstance(data, Mapping) or not isinstance(data.get("hits"), list):
                message = out.get("message") or out.get("warnings") or str(out)[:120]
                raise GdcError(f"{where}: no data.hits in the response ({message})")
            pagination = data.get("pagination") or {}
            reported = pagination.get("total")
            if not isinstance(reported, int) or reported < 0:
                raise GdcError(f"{where}: no pagination.total in the response")
            if total is not None and reported != total:
                raise GdcError(f"{where}: the total changed from {total} to {reported} while paging; rerun")
            total = reported
            hits = [_parse_hit(h, where) for h in data["hits"]]
            if not hits and len(files) < total:
                raise GdcError(f"{where}: listing truncated: got {len(files)} of the {total} files it reports; rerun")
            files += hits
        return files


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        raw = exc.read(2000)
    except OSError:
        return ""
    try:
        body = json.loads(raw)
        if isinstance(body, Mapping) and body.get("message"):
            return str(body["message"])
    except (ValueError, UnicodeDecodeError):
        pass
    return raw.decode("utf-8", "replace").strip()[:200]


# --- files: cache, manifest, present slides ---------------------------------------------------


def save_listing(files: Sequence[GdcFile], path: str | os.PathLike[str]) -> Path:
    """The query's result as JSON (so labels can be rebuilt offline)."""
    return write_text_atomic(path, json.dumps([asdict(f) for f in files], indent=1) + "\n")


def load_listing(path: str | os.PathLike[str]) -> list[GdcFile]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no saved GDC listing at {path}; run `bench gdc` once with network access")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        return [GdcFile(**r) for r in rows]
    except (ValueError, TypeError) as exc:
        raise DataError(f"{path} is not a GDC listing written by bench gdc ({exc}); delete it and rerun") from None


def manifest_text(files: Iterable[GdcFile]) -> str:
    """A gdc-client download manifest (see module docstring)."""
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_NONE)
    w.writerow(MANIFEST_COLUMNS)
    for f in sorted(files, key=lambda f: (f.file_name, f.file_id)):
        for value in (f.file_id, f.file_name, f.md5, f.state):
            if any(c in value for c in "\t\n\r#"):
                raise GdcError(f"GDC file {f.file_id} has a tab, newline or '#' in {value!r}; gdc-client cannot read it")
        w.writerow([f.file_id, f.file_name, f.md5, f.size, f.state])
    return buf.getvalue()


def write_manifest(files: Iterable[GdcFile], path: str | os.PathLike[str]) -> Path:
    return write_text_atomic(path, manifest_text(files))


def present_file(f: GdcFile, slide_dir: Path) -> str | None:
    """The slide's path relative to `slide_dir` when it is there whole (by size): ours or gdc-client's layout."""
    for rel in (f.file_name, f"{f.file_id}/{f.file_name}"):  # bench gdc --download; gdc-client -d slide_dir
        p = slide_dir / rel
        try:
            if p.is_file() and p.stat().st_size == f.size:
                return rel
        except OSError:
            continue
    return None


# --- downloads -----------------------------------------------------------------------------------


@dataclass
class DownloadReport:
    done: list[str]  # file names now whole in the slide folder (new or there before)
    new: list[str]
    failed: list[tuple[str, str]]  # (file name, reason)
    bytes_fetched: int = 0


def download_files(client: GdcClient, files: Sequence[GdcFile], slide_dir: str | os.PathLike[str], *,
                   check_space: bool = True, retries: int = 2, wait: float = 5.0,
                   on_error: Callable[[str, str], None] | None = None) -> DownloadReport:
    """Fetch the slides not yet whole in `slide_dir` (see module docstring); one failure does not stop the rest.

    A file whose transfer fails (cut connection, error status, md5 mismatch) is tried `retries` more
    times, `wait` x attempt seconds apart, resuming what arrived; what still fails is reported.
    """
    import time

    slide_dir = Path(slide_dir)
    slide_dir.mkdir(parents=True, exist_ok=True)
    report = DownloadReport(done=[], new=[], failed=[])
    pending = []
    for f in files:
        if present_file(f, slide_dir) is not None:
            report.done.append(f.file_name)
            continue
        final = slide_dir / f.file_name
        if final.exists():  # not ours to overwrite
            report.failed.append((f.file_name, f"{final} exists with {final.stat().st_size} bytes but the GDC lists "
                                               f"{f.size}; move it away to download it again"))
            continue
        pending.append(f)
    part_bytes = {f.file_id: _part_size(slide_dir, f) for f in pending}
    remaining = sum(f.size - part_bytes[f.file_id] for f in pending)
    if pending:
        info(f"downloading {len(pending)} slide(s), {human_size(remaining)} to fetch "
             f"({len(report.done)} already in {slide_dir})")
    if check_space and pending:
        free = shutil.disk_usage(slide_dir).free
        if free < remaining:
            raise GdcError(f"{slide_dir} has {human_size(free)} free, the {len(pending)} slide(s) need "
                           f"{human_size(remaining)}; free space or point --data-root elsewhere")
    bar = progress(total=remaining, unit="B", unit_scale=True, unit_divisor=1024, desc="gdc download")

    def on_bytes(n: int) -> None:  # every byte that arrived counts, a cut attempt's too (it is resumed)
        bar.update(n)
        report.bytes_fetched += n

    try:
        for f in pending:
            for attempt in range(retries + 1):
                try:
                    download_one(client, f, slide_dir, on_bytes=on_bytes)
                except GdcError as exc:
                    if attempt < retries:
                        info(f"{f.file_name}: {exc}; retrying ({attempt + 1} of {retries})")
                        time.sleep(wait * (attempt + 1))
                        continue
                    report.failed.append((f.file_name, str(exc)))
                    if on_error is not None:
                        on_error(f.file_name, str(exc))
                    break
                report.done.append(f.file_name)
                report.new.append(f.file_name)
                break
    finally:
        bar.close()
    return report


def _part_path(slide_dir: Path, f: GdcFile) -> Path:
    return slide_dir / f"{f.file_name}{PART_SUFFIX}"


def _part_size(slide_dir: Path, f: GdcFile) -> int:
    p = _part_path(slide_dir, f)
    return min(p.stat().st_size, f.size) if p.exists() else 0


def download_one(client: GdcClient, f: GdcFile, slide_dir: Path, *,
                 on_bytes: Callable[[int], Any] | None = None) -> int:
    """Download (or resume) one slide; returns the bytes fetched now. Raises GdcError naming the file."""
    final = slide_dir / f.file_name
    part = _part_path(slide_dir, f)
    offset = part.stat().st_size if part.exists() else 0
    if offset > f.size:  # not a prefix of this file
        part.unlink()
        offset = 0
    md5 = hashlib.md5()
    if offset:
        with open(part, "rb") as fh:
            for block in iter(lambda: fh.read(CHUNK), b""):
                md5.update(block)
    fetched = 0
    if offset < f.size:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = client.open(f"data/{f.file_id}", headers=headers)
        with resp:
            status = getattr(resp, "status", 200)
            if offset and status != 206:  # the server ignored the range: start over
                offset = 0
                md5 = hashlib.md5()
            mode = "ab" if offset else "wb"
            with open(part, mode) as out:
                while True:
                    try:
                        block = resp.read(CHUNK)
                    except (http.client.HTTPException, OSError):
                        break  # a cut connection: what arrived stays in the part for the rerun
                    if not block:
                        break
                    try:
                        out.write(block)
                    except OSError as exc:
                        raise GdcError(f"cannot write {part}: {exc}") from None
                    md5.update(block)
                    fetched += len(block)
                    if on_bytes is not None:
                        on_bytes(len(block))
    size = part.stat().st_size if part.exists() else 0
    if size < f.size:
        raise GdcError(f"download of {f.file_name} ({f.file_id}) stopped at {human_size(size)} of "
                       f"{human_size(f.size)} ({size} of {f.size} bytes); kept as {part.name}: rerun to resume")
    if size > f.size:
        part.unlink()
        raise GdcError(f"download of {f.file_name} ({f.file_id}) gave {size} bytes, the GDC lists {f.size}; "
                       "the partial file was deleted: rerun to fetch it again")
    digest = md5.hexdigest()
    if digest != f.md5:
        part.unlink()
        raise GdcError(f"md5 of {f.file_name} ({f.file_id}) is {digest}, the GDC lists {f.md5}: the download is "
                       "damaged and was deleted; rerun to fetch it again")
    os.replace(part, final)
    return fetched


# --- labels ------------------------------------------------------------------------------------


def project_labels(files: Iterable[GdcFile], classes: Sequence[str] | None = None) -> pd.DataFrame:
    """slide_id, patient_id, label: the project without its program (TCGA-LUAD -> LUAD)."""
    import pandas as pd

    rows = [(f.slide_id, f.case, f.project.split("-", 1)[-1]) for f in files]
    df = pd.DataFrame(rows, columns=["slide_id", "patient_id", "label"])
    if classes is not None:
        bad = sorted(set(df["label"]) - set(classes))
        if bad:
            raise DataError(f"GDC projects give label(s) {bad}, not among the classes {list(classes)}")
    return df.sort_values("slide_id").reset_index(drop=True)


def survival_labels(files: Iterable[GdcFile]) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """(slide_id, patient_id, time (days), event) and the (patient, reason) left out (see module docstring)."""
    import pandas as pd

    rows, left_out = [], {}
    for f in files:
        status = (f.vital_status or "").strip().lower()
        if status == "dead":
            time, event = f.days_to_death, 1
            why = "dead without days_to_death"
        elif status == "alive":
            time, event = f.days_to_last_follow_up, 0
            why = "alive without days_to_last_follow_up"
        else:
            time, event, why = None, 0, f"vital status {f.vital_status!r}"
        if time is None or time < 0:
            left_out[f.case] = why if time is None else f"negative time {time:g}"
            continue
        rows.append((f.slide_id, f.case, float(time), event))
    df = pd.DataFrame(rows, columns=["slide_id", "patient_id", "time", "event"])
    df = df[~df["patient_id"].isin(left_out)]  # a patient with one unusable slide record is out entirely
    return df.sort_values("slide_id").reset_index(drop=True), sorted(left_out.items())


# --- one cohort folder ---------------------------------------------------------------------------

STATE_FILE = ".bench-gdc.json"  # sha256 of the labels files bench gdc wrote in a cohort folder


def cohort_projects(data: str) -> tuple[str, ...] | None:
    """GDC projects of a suite's data folder name: TCGA-NSCLC = LUAD + LUSC, TCGA-X = itself, else None."""
    if data.upper() == "TCGA-NSCLC":
        return ("TCGA-LUAD", "TCGA-LUSC")
    return (data.upper(),) if data.upper().startswith("TCGA-") else None


@dataclass
class CohortFetch:
    """What `fetch_cohort` did for one folder (the CLI's summary row)."""

    folder: Path
    listed: int = 0  # slides the GDC (or the shipped list) names
    total_bytes: int = 0
    present: int = 0
    labels_rows: int = 0
    labels: Path | None = None
    manifest: Path | None = None
    not_on_gdc: list[str] | None = None  # shipped slide ids the GDC does not list
    left_out: list[tuple[str, str]] | None = None  # (patient, why) without usable survival labels
    download: DownloadReport | None = None


def fetch_cohort(folder: str | os.PathLike[str], name: str, *, task: str, classes: Sequence[str] | None = None,
                 labels_name: str = "labels.csv", paper_source: str | None = None,
                 projects: Sequence[str] | None = None, client: GdcClient | None = None, offline: bool = False,
                 download: bool = False, retries: int = 2) -> CohortFetch:
    """Manifest, optional download and labels of one cohort folder (`folder/slides/`, `folder/<labels_name>`).

    `name` (the suite's dataset) names the listing and manifest (`gdc_files.<name>.json`,
    `gdc_manifest.<name>.txt`): two datasets may share a folder (TCGA-BRCA subtyping and survival).

    Which slides: the shipped paper split's (`paper_source`) when given, else every open diagnostic slide of
    `projects`; with neither GDC source (PANDA) only the labels of the slides present are written. Labels: the
    authors' for a paper split, else the project (classification) or the GDC's survival fields. Only slides
    whole in `slides/` get a labels row (with a `filename` column), so `bench run` sees a complete cohort and
    the paper protocol reports whatever is still missing.
    """
    import pandas as pd

    from bench.data.paper import paper_labels

    folder = Path(folder)
    slides = folder / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    result = CohortFetch(folder=folder)
    shipped = paper_labels(paper_source) if paper_source else None
    if projects:
        listing = folder / f"gdc_files.{name}.json"
        if offline:
            files = load_listing(listing)
        else:
            client = client or GdcClient()
            names = [f"{sid}.svs" for sid in shipped["slide_id"]] if shipped is not None else None
            files = client.slide_files(projects=projects, file_names=names)
            save_listing(files, listing)
        if shipped is not None:
            listed = {f.slide_id for f in files}
            result.not_on_gdc = sorted(set(shipped["slide_id"]) - listed)
        result.listed, result.total_bytes = len(files), sum(f.size for f in files)
        result.manifest = write_manifest(files, folder / f"gdc_manifest.{name}.txt")
        if download:
            result.download = download_files(client or GdcClient(), files, slides, retries=retries)
        present = {f.slide_id: (f, rel) for f in files if (rel := present_file(f, slides)) is not None}
        chosen = [f for f, _ in present.values()]
        if shipped is not None:
            labels = shipped[shipped["slide_id"].isin(present)]
        elif task == "survival":
            labels, result.left_out = survival_labels(chosen)
        else:
            labels = project_labels(chosen, classes)
        labels = labels.assign(filename=[present[s][1] for s in labels["slide_id"]])
    else:
        if shipped is None:
            raise DataError(f"{folder.name} is not a GDC project and has no shipped split: nothing to fetch or label")
        result.listed = len(shipped)
        found = _slides_by_stem(slides)
        labels = shipped[shipped["slide_id"].isin(found)]
        labels = labels.assign(filename=[found[s] for s in labels["slide_id"]])
    result.present = len(labels)
    result.labels_rows = len(labels)
    result.labels = _write_labels(folder, labels_name, pd.DataFrame(labels).reset_index(drop=True))
    return result


def _slides_by_stem(slides: Path) -> dict[str, str]:
    from bench.data.slides import SLIDE_EXTENSIONS

    exts = {e.lower() for e in SLIDE_EXTENSIONS}
    return {p.name[: -len(p.suffix)]: p.name for p in sorted(slides.iterdir())
            if p.is_file() and p.suffix.lower() in exts}


def _write_labels(folder: Path, name: str, labels: pd.DataFrame) -> Path:
    """Write a labels file, never over one bench gdc did not write (its sha256 is kept in STATE_FILE)."""
    path = folder / name
    state_file = folder / STATE_FILE
    state = json.loads(state_file.read_text(encoding="utf-8")) if state_file.exists() else {}
    text = labels.to_csv(index=False, lineterminator="\n")
    if path.exists():
        current = hashlib.sha256(path.read_bytes()).hexdigest()
        if current != state.get(name):
            raise DataError(f"{path} exists and was not written by bench gdc (or was edited since); it is left as "
                            f"it is. Move it away to have bench gdc write the labels")
        if path.read_text(encoding="utf-8") == text:
            return path
    write_text_atomic(path, text)
    state[name] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    write_text_atomic(state_file, json.dumps(state, indent=1, sort_keys=True) + "\n")
    return path


__all__ = ["API", "MANIFEST_COLUMNS", "FIELDS", "GdcError", "GdcFile", "GdcClient", "slide_filters",
           "manifest_text", "write_manifest", "save_listing", "load_listing", "present_file", "download_files",
           "download_one", "DownloadReport", "project_labels", "survival_labels", "human_size", "cohort_projects",
           "fetch_cohort", "CohortFetch"]
