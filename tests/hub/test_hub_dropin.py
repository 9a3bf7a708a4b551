"""scvi.hub-style code against jaxvi.hub: HubMetadata / HubModelCardHelper ``from_dir``,
HubModel built from those objects, and the Hugging Face push and pull.

There is no network here. Push and pull run through huggingface_hub itself against
``FakeHub``, a local HTTP server (bound to 127.0.0.1 on a free port, in-memory, stopped after
the module) that speaks the small part of the Hub API those calls use: repo creation,
README YAML validation, preupload (every file "regular", so no LFS or Xet transfer), the
NDJSON commit, repo info, tree listing, file resolve (HEAD/GET) and adding a collection
item. huggingface_hub is pointed at it by patching ``huggingface_hub.constants.ENDPOINT``
(what ``HF_ENDPOINT`` sets). One test then stops the server and pulls again with
``HF_HUB_OFFLINE``, from huggingface_hub's cache layout alone.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import jaxvi
from jaxvi import hub
from jaxvi.data import synthetic_iid
from jaxvi.hub import (
    HubFileNotFoundError,
    HubMetadata,
    HubModel,
    HubModelCardHelper,
    ModelCard,
    validate_url_format,
)

ANNDATA_VERSION = "0.11.4"


@pytest.fixture(scope="module")
def model():
    jaxvi.settings.seed = 0
    adata = synthetic_iid(batch_size=60, n_genes=40, n_proteins=0, n_regions=0, seed=1)
    jaxvi.SCVI.setup_anndata(adata, batch_key="batch", labels_key="labels")
    m = jaxvi.SCVI(adata, n_hidden=16, n_latent=4)
    m.train(max_epochs=2, enable_progress_bar=False)
    return m


def _same_latent(a, b, adata=None):
    np.testing.assert_array_equal(
        a.get_latent_representation(adata), b.get_latent_representation(adata)
    )


def _header(card: str) -> dict:
    yaml = pytest.importorskip("yaml")
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match is not None
    return yaml.safe_load(match.group(1))


def _json_block(card: str, title: str):
    section = card.split(f"<strong>{title}</strong>")[1]
    return json.loads(section.split("```json\n")[1].split("```")[0])


def _table_rows(card: str, first_header_cell: str) -> list[str]:
    lines = card.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header_cell}"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


# ------------------------------------------------------------------ metadata
def test_metadata_from_dir_of_jaxvi_files(model, tmp_path):
    d = tmp_path / "m"
    model.save(str(d))
    meta = HubMetadata.from_dir(str(d), anndata_version=ANNDATA_VERSION)
    assert meta == HubMetadata(
        scvi_version=None,
        anndata_version=ANNDATA_VERSION,
        model_cls_name="SCVI",
        training_data_url=None,
        model_parent_module="jaxvi",
        model_format="jaxvi",
        jaxvi_version=jaxvi.__version__,
    )
    url = "https://example.org/data/train.h5ad"
    meta = HubMetadata.from_dir(str(d), ANNDATA_VERSION, "cpu", training_data_url=url)
    assert meta.training_data_url == url
    with pytest.raises(ValueError, match="Invalid URL format"):
        HubMetadata.from_dir(str(d), ANNDATA_VERSION, training_data_url="not a url")
    empty = tmp_path / "empty"
    empty.mkdir()
    # scvi-tools raises ValueError here, jaxvi raised FileNotFoundError: the error is both
    with pytest.raises(ValueError, match="No model files") as info:
        HubMetadata.from_dir(str(empty), ANNDATA_VERSION)
    assert isinstance(info.value, FileNotFoundError)


def test_metadata_defaults_and_save_are_scvi_tools(tmp_path):
    meta = HubMetadata("1.4.2", ANNDATA_VERSION, "SCVI")
    assert meta.training_data_url is None
    assert meta.model_parent_module == "scvi.model"
    path = str(tmp_path / "meta.json")
    meta.save(path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        meta.save(save_path=path)
    scvi_meta = dataclasses.replace(meta, model_format="scvi-tools")
    scvi_meta.save(path, overwrite=True)
    with open(path) as f:
        content = json.load(f)
    assert content == {
        "scvi_version": "1.4.2",
        "anndata_version": ANNDATA_VERSION,
        "model_cls_name": "SCVI",
        "training_data_url": None,
        "model_parent_module": "scvi.model",
    }
    assert HubMetadata.load(path) == scvi_meta
    ref = pytest.importorskip("scvi.hub")
    assert dataclasses.asdict(ref.HubMetadata(**content)) == content


def test_url_form_is_checked_without_a_request():
    for url in ("https://cellxgene.cziscience.com/e/abc.cxg/", "http://127.0.0.1:8000/x.h5ad"):
        assert validate_url_format(url) == url
    for url in ("cellxgene.cziscience.com/x", "file:///etc/passwd", "https://", "http://a b"):
        with pytest.raises(ValueError, match="Invalid URL format"):
            validate_url_format(url)


# ---------------------------------------------------------------- card helper
def test_card_helper_from_dir_of_jaxvi_files(model, tmp_path):
    d = tmp_path / "m"
    model.save(str(d), save_anndata=True)
    tables = {"cell_wise_cv": "| cell table |", "gene_wise_cv": "| gene table |"}
    (d / "metrics.json").write_text(json.dumps(tables))
    helper = HubModelCardHelper.from_dir(
        str(d),
        license_info="cc-by-4.0",
        anndata_version=ANNDATA_VERSION,
        data_modalities=["rna"],
        tissues=["blood"],
        data_is_annotated=True,
        description="Two epochs on synthetic data.",
    )
    assert helper.model_cls_name == "SCVI"
    assert helper.scvi_version is None
    assert helper.jaxvi_version == jaxvi.__version__
    assert helper.model_init_params == model.init_params_
    assert helper.model_setup_anndata_args == model.registry_["setup_args"]
    assert helper.model_summary_stats == model.registry_["summary_stats"]
    assert helper.model_data_registry["batch"] == "adata.obs['_scvi_batch']"
    assert helper.metrics_report == tables
    assert helper.data_is_minified is False  # read from adata.h5ad
    assert helper.model_parent_module == "jaxvi"

    card = helper.model_card
    assert isinstance(card, ModelCard)
    header = _header(card)
    assert header["library_name"] == "jaxvi"
    assert header["license"] == "cc-by-4.0"
    assert header["tags"] == [
        "biology",
        "genomics",
        "single-cell",
        "model_cls_name:SCVI",
        f"jaxvi_version:{jaxvi.__version__}",
        f"anndata_version:{ANNDATA_VERSION}",
        "modality:rna",
        "tissue:blood",
        "annotated:True",
    ]
    assert "| cell table |" in card
    assert "| gene table |" in card
    assert _json_block(card, "Model Parameters") == model.init_params_
    assert "Two epochs on synthetic data." in card
    assert "- **Data is Minified**: False" in card

    # the card follows the fields
    helper.description = "Edited."
    assert "Edited." in helper.model_card

    # an explicit metrics path is read (scvi-tools reads local_dir/metrics.json whatever it gets)
    other = tmp_path / "other_metrics.json"
    other.write_text(json.dumps({"diff_exp": "| de table |"}))
    helper = HubModelCardHelper.from_dir(
        str(d), "mit", ANNDATA_VERSION, metrics_report=str(other), data_is_minified=True
    )
    assert helper.metrics_report == {"diff_exp": "| de table |"}
    assert "| de table |" in helper.model_card
    assert "- **Data is Minified**: True" in helper.model_card


def test_card_helper_errors(model):
    fields = dict(
        license_info="cc-by-4.0",
        model_cls_name="SCVI",
        model_init_params=model.init_params_,
        model_setup_anndata_args=model.registry_["setup_args"],
        model_summary_stats=model.registry_["summary_stats"],
        model_data_registry={"X": "adata.X"},
        scvi_version=None,
        anndata_version=ANNDATA_VERSION,
    )
    assert HubModelCardHelper(**fields).model_card.startswith("---\nlibrary_name: jaxvi\n")
    with pytest.raises(ValueError, match="TOTALVI not recognized"):
        HubModelCardHelper(**{**fields, "model_cls_name": "TOTALVI"})
    with pytest.raises(ValueError, match="Invalid URL format"):
        HubModelCardHelper(**fields, training_code_url="github.com/me/code")
    with pytest.raises(TypeError, match="metrics_report must be a dict"):
        HubModelCardHelper(**fields, metrics_report="metrics.json")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        HubModelCardHelper.from_dir("/nonexistent/dir", "mit", ANNDATA_VERSION)


def test_from_dir_on_scvi_tools_files_equals_scvi_tools(tmp_path):
    """A directory saved by scvi-tools itself (batch, labels and both kinds of covariates):
    jaxvi's HubMetadata and HubModelCardHelper hold what scvi-tools' do, and the card's
    header, parameters, registry and summary tables agree."""
    ref = pytest.importorskip("scvi.hub")
    scvi = pytest.importorskip("scvi")
    adata = synthetic_iid(batch_size=50, n_genes=30, n_proteins=0, n_regions=0, seed=2)
    adata.obs["donor"] = np.where(np.arange(adata.n_obs) % 3 == 0, "d0", "d1")
    adata.obs["pct_mito"] = np.linspace(0.0, 1.0, adata.n_obs)
    scvi.model.SCVI.setup_anndata(
        adata,
        batch_key="batch",
        labels_key="labels",
        categorical_covariate_keys=["donor"],
        continuous_covariate_keys=["pct_mito"],
    )
    ref_model = scvi.model.SCVI(adata, n_latent=5, dispersion="gene-batch")
    ref_model.is_trained_ = True  # its initial weights serve: only their transfer is checked
    ref_model.module.eval()  # no dropout in its own latent either
    d = str(tmp_path / "scvi_dir")
    ref_model.save(d, save_anndata=True)

    ours = HubMetadata.from_dir(d, ANNDATA_VERSION)
    theirs_meta = ref.HubMetadata.from_dir(d, ANNDATA_VERSION)
    assert ours.to_dict() == dataclasses.asdict(theirs_meta)
    assert ours.model_format == "scvi-tools"

    kw = dict(data_modalities=["rna"], tissues=["lung"], data_is_annotated=False)
    ours = HubModelCardHelper.from_dir(d, "cc-by-4.0", ANNDATA_VERSION, **kw)
    theirs = ref.HubModelCardHelper.from_dir(d, "cc-by-4.0", ANNDATA_VERSION, **kw)
    assert ours.model_init_params == theirs.model_init_params
    assert ours.model_setup_anndata_args == theirs.model_setup_anndata_args
    assert ours.model_summary_stats == dict(theirs.model_summary_stats)
    assert ours.model_data_registry == {k: dict(v) for k, v in theirs.model_data_registry.items()}
    assert ours.scvi_version == theirs.scvi_version
    assert ours.data_is_minified is theirs.data_is_minified is False
    assert ours.model_parent_module == theirs.model_parent_module

    our_card, their_card = str(ours.model_card), str(theirs.model_card)
    assert _header(our_card) == _header(their_card)
    for title in ("Model Parameters", "Setup Data Arguments"):
        assert _json_block(our_card, title) == _json_block(their_card, title)
    assert _table_rows(our_card, "Registry Key") == _table_rows(their_card, "Registry Key")
    rows = _table_rows(our_card, "Summary Stat Key")
    assert rows == _table_rows(their_card, "Summary Stat Key")
    assert len(rows) == 6
    # jaxvi's card opens in scvi-tools' HubModel, and scvi-tools' helper in jaxvi's
    card_path = tmp_path / "card_from_jaxvi.md"
    card_path.write_text(our_card)
    theirs_hub = ref.HubModel(d, metadata=theirs_meta, model_card=str(card_path))
    assert theirs_hub.model_card.data.library_name == "scvi-tools"
    h = HubModel(d, metadata=theirs_meta, model_card=theirs)
    assert h.model_card == str(theirs.model_card)
    assert h.metadata.model_format is None  # left to the files
    assert h.model_format.name == "scvi-tools"
    assert dataclasses.replace(h.metadata, model_format="scvi-tools").to_dict() == (
        dataclasses.asdict(theirs_meta)
    )
    np.testing.assert_allclose(
        h.model.get_latent_representation(),
        ref_model.get_latent_representation(),
        rtol=1e-4,
        atol=1e-5,
    )


# ------------------------------------------------------------------ the card
def test_model_card_object(tmp_path):
    text = "---\nlicense: mit\nlibrary_name: jaxvi\ntags:\n- biology\n---\n\n# Body\n"
    card = ModelCard(text)
    assert card == text  # still the plain text
    assert "# Body" in card
    assert card.content == text
    assert card.text == "\n# Body\n"
    path = tmp_path / "sub" / "README.md"
    card.save(path)
    assert path.read_text() == text
    assert ModelCard.load(path) == text
    assert ModelCard("no header").text == "no header"
    pytest.importorskip("huggingface_hub")
    assert card.data.license == "mit"
    assert card.data.tags == ["biology"]
    assert card.to_huggingface().text == card.text


# ------------------------------------------------------------------- HubModel
def test_hub_model_from_objects_save_and_reload(model, tmp_path):
    d = tmp_path / "m"
    model.save(str(d), save_anndata=True)
    with pytest.raises(ValueError, match="No metadata found") as info:
        HubModel(str(d))
    assert isinstance(info.value, FileNotFoundError)
    meta = HubMetadata.from_dir(str(d), ANNDATA_VERSION)
    with pytest.raises(HubFileNotFoundError, match="No model card found"):
        HubModel(str(d), metadata=meta)
    helper = HubModelCardHelper.from_dir(str(d), "cc-by-4.0", ANNDATA_VERSION)
    h = HubModel(str(d), metadata=meta, model_card=helper)
    assert h.metadata is meta
    assert h.model_card == helper.model_card
    assert h.local_dir == str(d)
    assert h.repo_name is None
    h.save()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        h.save()
    h.save(overwrite=True)

    again = HubModel(str(d))
    assert again.metadata == meta
    assert again.model_card == helper.model_card
    assert again.read_adata() is None  # as scvi-tools: fills .adata, returns nothing
    assert again.adata.shape == model.adata.shape
    _same_latent(again.model, model)
    loaded = again.load_model(adata=model.adata.copy())
    assert again.model is loaded
    _same_latent(loaded, model)
    assert "model loaded=yes" in repr(again)
    with pytest.raises(ValueError, match="accelerator='tpu'"):
        again.load_model(accelerator="tpu")

    # paths for both, and a metadata that leaves the format to the files
    meta_path = tmp_path / "meta.json"
    bare = HubMetadata(None, ANNDATA_VERSION, "SCVI", model_parent_module="jaxvi")
    bare.save(str(meta_path))
    h = HubModel(d, metadata=str(meta_path), model_card=str(d / "README.md"))
    assert h.metadata.model_format is None
    assert h.model_format.name == "jaxvi"
    _same_latent(h.model, model)
    h.save(overwrite=True)
    assert HubModel(str(d)).metadata.model_format == "jaxvi"
    with pytest.raises(TypeError, match="metadata must be"):
        HubModel(str(d), metadata={"model_cls_name": "SCVI"})


def test_model_without_data_and_large_training_data(model, tmp_path, fake_server):
    d = tmp_path / "m"
    model.save(str(d))  # no adata.h5ad
    helper = HubModelCardHelper.from_dir(str(d), "cc-by-4.0", ANNDATA_VERSION)
    meta = HubMetadata.from_dir(str(d), ANNDATA_VERSION)
    h = HubModel(str(d), metadata=meta, model_card=helper)
    assert h.adata is None
    assert h.large_training_adata is None  # no file, no URL
    assert h.model.adata is None  # jaxvi loads it without data (scvi-tools raises)
    _same_latent(h.model, model, model.adata)

    # the data too large to upload, served at the metadata's training_data_url
    data_path = tmp_path / "train.h5ad"
    model.adata.write_h5ad(data_path)
    fake_server.files["train.h5ad"] = data_path.read_bytes()
    url = f"{fake_server.url}/files/train.h5ad"
    h = HubModel(
        str(d), metadata=dataclasses.replace(meta, training_data_url=url), model_card=helper
    )
    loaded = h.load_model()
    assert (d / "large_training_adata.h5ad").exists()
    assert loaded.adata.shape == model.adata.shape
    _same_latent(loaded, model)
    cxg = "https://cellxgene.cziscience.com/e/0123.cxg/"
    (d / "large_training_adata.h5ad").unlink()
    h = HubModel(
        str(d), metadata=dataclasses.replace(meta, training_data_url=cxg), model_card=helper
    )
    with pytest.raises(NotImplementedError, match="cellxgene explorer session"):
        h.read_large_training_adata()


# --------------------------------------------------------------- the fake hub
def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """In-memory Hugging Face Hub on 127.0.0.1 (see the module docstring)."""

    MAX_BODY = 64 << 20

    def __init__(self):
        self.repos: dict[str, dict] = {}  # id -> {"commits": {sha: {path: bytes}}, "main": sha}
        self.collections: dict[str, list[str]] = {}
        self.files: dict[str, bytes] = {}  # served at /files/<name>
        self.tokens: list[str | None] = []
        self.lock = threading.Lock()
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30

            def log_message(self, *args):
                pass

            def do_GET(self):
                hub_.dispatch(self)

            do_HEAD = do_POST = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        if not self.thread.is_alive():
            return
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    @staticmethod
    def send(h, code, body=b"", headers=None):
        headers = dict(headers or {})
        if isinstance(body, dict | list):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        h.send_response(code)
        h.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def dispatch(self, h):
        path = urllib.parse.unquote(urllib.parse.urlsplit(h.path).path)
        size = int(h.headers.get("Content-Length") or 0)
        if size > self.MAX_BODY:
            return self.send(h, 413, {"error": "too large for the fake hub"})
        body = h.rfile.read(size) if h.command == "POST" else b""
        self.tokens.append(h.headers.get("Authorization"))
        with self.lock:
            return self.route(h, h.command, path, body)

    def route(self, h, method, path, body):
        if method == "POST" and path == "/api/repos/create":
            req = json.loads(body)
            rid = f"{req['organization']}/{req['name']}"
            if rid in self.repos:
                return self.send(h, 409, {"error": "You already created this model repo"})
            sha = hashlib.sha1(rid.encode()).hexdigest()
            self.repos[rid] = {"commits": {sha: {}}, "main": sha}
            return self.send(h, 200, {"url": f"{self.url}/{rid}"})
        if method == "POST" and path == "/api/validate-yaml":
            import yaml

            match = re.match(r"^---\n(.*?)\n---\n", json.loads(body)["content"], re.S)
            try:
                ok = match is not None and isinstance(yaml.safe_load(match.group(1)), dict)
            except yaml.YAMLError:
                ok = False
            if not ok:
                return self.send(h, 400, {"errors": [{"message": "invalid YAML header"}]})
            return self.send(h, 200, {"errors": [], "warnings": []})
        m = re.fullmatch(r"/api/collections/(.+)/items", path)
        if method == "POST" and m:
            slug = m.group(1)
            items = self.collections.setdefault(slug, [])
            items.append(json.loads(body)["item"]["id"])
            return self.send(h, 200, _collection_json(slug, items))
        m = re.fullmatch(r"/files/([^/]+)", path)
        if method in ("GET", "HEAD") and m:
            if m.group(1) not in self.files:
                return self.send(h, 404, {"error": "no such file"})
            return self.send(h, 200, self.files[m.group(1)])
        m = re.fullmatch(
            r"/api/models/([^/]+/[^/]+)/(preupload|commit|revision|tree)/([^/]+).*", path
        )
        if m:
            return self.repo_api(h, method, *m.groups(), body)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if method in ("GET", "HEAD") and m:
            rid, rev, name = m.groups()
            files, sha = self.snapshot(rid, rev)
            if files is None or name not in files:
                return self.send(h, 404, b"", {"X-Error-Code": "EntryNotFound"})
            return self.send(
                h,
                200,
                files[name],
                {"X-Repo-Commit": sha, "ETag": f'"{_git_blob_sha(files[name])}"'},
            )
        return self.send(h, 404, {"error": f"the fake hub does not serve {method} {path}"})

    def snapshot(self, rid, rev):
        repo = self.repos.get(rid)
        if repo is None:
            return None, None
        sha = repo["main"] if rev == "main" else rev
        return repo["commits"].get(sha), sha

    def repo_api(self, h, method, rid, op, rev, body):
        files, sha = self.snapshot(rid, rev)
        if files is None:
            code = "RepoNotFound" if rid not in self.repos else "RevisionNotFound"
            return self.send(h, 404, {"error": code}, {"X-Error-Code": code})
        if op == "preupload":
            paths = [f["path"] for f in json.loads(body)["files"]]
            out = [{"path": p, "uploadMode": "regular", "shouldIgnore": False} for p in paths]
            return self.send(h, 200, {"files": out})
        if op == "commit":
            new = dict(files)
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    new[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] != "header":
                    return self.send(h, 400, {"error": f"unsupported {item['key']}"})
            listing = json.dumps(sorted((p, _git_blob_sha(v)) for p, v in new.items()))
            new_sha = hashlib.sha1((sha + listing).encode()).hexdigest()
            self.repos[rid]["commits"][new_sha] = new
            self.repos[rid]["main"] = new_sha
            return self.send(
                h, 200, {"commitUrl": f"{self.url}/{rid}/commit/{new_sha}", "commitOid": new_sha}
            )
        if op == "revision":
            siblings = [{"rfilename": p} for p in sorted(files)]
            return self.send(h, 200, {"id": rid, "sha": sha, "siblings": siblings})
        return self.send(
            h,
            200,
            [
                {"type": "file", "path": p, "size": len(v), "oid": _git_blob_sha(v)}
                for p, v in sorted(files.items())
            ],
        )


def _collection_json(slug, items):
    return {
        "slug": slug,
        "title": "models",
        "owner": {"name": slug.split("/")[0]},
        "items": [
            {"_id": f"{i}", "id": item, "type": "model", "position": i}
            for i, item in enumerate(items)
        ],
        "lastUpdated": "2025-01-01T00:00:00.000Z",
        "position": 0,
        "private": False,
        "theme": "blue",
        "upvotes": 0,
    }


@pytest.fixture
def fake_server():
    server = FakeHub()
    yield server
    server.close()


@pytest.fixture
def fake_hub(fake_server, monkeypatch):
    """The fake server, with huggingface_hub pointed at it."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "ENDPOINT", fake_server.url)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        fake_server.url + "/{repo_id}/resolve/{revision}/{filename}",
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return fake_server


# -------------------------------------------------------------- push and pull
def test_push_then_pull_through_huggingface_hub(model, tmp_path, fake_hub, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    from huggingface_hub.errors import RepositoryNotFoundError

    d = tmp_path / "m"
    model.save(str(d), save_anndata=True)
    (d / "metrics.json").write_text(json.dumps({"cell_wise_cv": "| t |"}))
    meta = HubMetadata.from_dir(str(d), ANNDATA_VERSION)
    card = HubModelCardHelper.from_dir(str(d), "cc-by-4.0", ANNDATA_VERSION, tissues=["blood"])
    h = HubModel(str(d), metadata=meta, model_card=card)
    token_file = tmp_path / "token"
    token_file.write_text("hf_filetoken\n")
    with pytest.raises(RepositoryNotFoundError):
        h.push_to_huggingface_hub("me/jaxvi-scvi", repo_token="hf_token")
    info = h.push_to_huggingface_hub(
        "me/jaxvi-scvi",
        str(token_file),
        repo_create=True,
        collection_name="me/my-models-0123",
    )
    assert h.repo_name == "me/jaxvi-scvi"
    assert fake_hub.tokens[-1] == "Bearer hf_filetoken"
    files, sha = fake_hub.snapshot("me/jaxvi-scvi", "main")
    assert info.oid == sha
    assert set(files) == {
        "README.md",
        "_scvi_required_metadata.json",
        "model.json",
        "model.npz",
        "adata.h5ad",
        "metrics.json",
    }
    assert files["README.md"].decode() == str(card.model_card)
    assert json.loads(files["_scvi_required_metadata.json"]) == meta.to_dict()
    assert files["model.npz"] == (d / "model.npz").read_bytes()
    assert fake_hub.collections == {"me/my-models-0123": ["me/jaxvi-scvi"]}

    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match="No revision was passed"):
        pulled = HubModel.pull_from_huggingface_hub("me/jaxvi-scvi", cache_dir=str(cache))
    assert pulled.repo_name == "me/jaxvi-scvi"
    assert pulled.local_dir.startswith(str(cache))
    assert pulled.local_dir.endswith(sha)
    assert pulled.metadata == meta
    assert pulled.model_card == card.model_card
    assert pulled.metrics == {"cell_wise_cv": "| t |"}
    assert pulled.adata.shape == model.adata.shape
    _same_latent(pulled.model, model)

    # a second commit without the data; pulling without it does not download it
    info2 = h.push_to_huggingface_hub(
        "me/jaxvi-scvi", "hf_token", push_anndata=False, commit_message="again"
    )
    assert info2.oid != sha
    lean = HubModel.pull_from_huggingface_hub(
        "me/jaxvi-scvi", cache_dir=str(tmp_path / "cache2"), revision="main", pull_anndata=False
    )
    assert not os.path.exists(os.path.join(lean.local_dir, "adata.h5ad"))
    assert lean.adata is None
    old = HubModel.pull_from_huggingface_hub(
        "me/jaxvi-scvi", cache_dir=str(tmp_path / "cache3"), revision=sha
    )
    assert old.local_dir.endswith(sha)

    # the data too large for the Hub: refused unless it stays behind
    monkeypatch.setattr("jaxvi.hub._huggingface.MAX_HF_UPLOAD_SIZE", 1)
    with pytest.raises(ValueError, match="too large to upload"):
        h.push_to_huggingface_hub("me/jaxvi-scvi", "hf_token")
    h.push_to_huggingface_hub("me/jaxvi-scvi", "hf_token", push_anndata=False)

    # offline, from huggingface_hub's cache alone
    fake_hub.close()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = HubModel.pull_from_huggingface_hub(
        "me/jaxvi-scvi", cache_dir=str(cache), revision=sha
    )
    assert offline.local_dir == pulled.local_dir
    _same_latent(offline.model, model)


def test_push_scvi_tools_files_and_open_them_in_scvi_tools(model, tmp_path, fake_hub):
    """A hub directory in scvi-tools' format, pushed by jaxvi and pulled: jaxvi loads it,
    and scvi-tools' own HubModel opens the pulled folder and loads the same model."""
    d = tmp_path / "scvi_fmt"
    hub.save_hub_model(model, str(d), model_format="scvi-tools", metrics=None)
    HubModel(str(d)).push_to_huggingface_hub("me/scvi-fmt", "hf_token", repo_create=True)
    files, _ = fake_hub.snapshot("me/scvi-fmt", "main")
    assert {"model.pt", "adata.h5ad", "README.md", "_scvi_required_metadata.json"} <= set(files)
    pulled = HubModel.pull_from_huggingface_hub(
        "me/scvi-fmt", cache_dir=str(tmp_path / "cache"), revision="main"
    )
    assert pulled.metadata.model_format == "scvi-tools"
    assert "library_name: scvi-tools" in pulled.model_card
    _same_latent(pulled.model, model)
    ref = pytest.importorskip("scvi.hub")
    ours_helper = HubModelCardHelper.from_dir(str(d), "mit", ANNDATA_VERSION)
    theirs_helper = ref.HubModelCardHelper.from_dir(str(d), "mit", ANNDATA_VERSION)
    assert _header(ours_helper.model_card) == _header(str(theirs_helper.model_card))
    assert ours_helper.model_summary_stats == dict(theirs_helper.model_summary_stats)
    assert ours_helper.model_init_params == theirs_helper.model_init_params
    theirs = ref.HubModel(pulled.local_dir)
    assert theirs.metadata.scvi_version == "1.4.2"
    np.testing.assert_allclose(
        theirs.model.get_latent_representation(),
        model.get_latent_representation(),
        rtol=1e-4,
        atol=1e-5,
    )


def test_push_and_pull_need_huggingface_hub(model, tmp_path, monkeypatch):
    import builtins

    d = tmp_path / "m"
    hub.save_hub_model(model, str(d), metrics=None, save_anndata=False)
    real_import = builtins.__import__

    def no_hf(name, *args, **kwargs):
        if name == "huggingface_hub" or name.startswith("huggingface_hub."):
            raise ImportError("No module named 'huggingface_hub'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hf)
    with pytest.raises(ImportError, match=r"jaxvi\[hub\]"):
        HubModel(str(d)).push_to_huggingface_hub("me/x", "hf_token")
    with pytest.raises(ImportError, match=r"jaxvi\[hub\]"):
        HubModel.pull_from_huggingface_hub("me/x", revision="main")
    # reading and writing hub directories does not need it
    assert HubModel(str(d)).model_card.text.startswith("\n")


def test_from_dir_with_another_registered_format(model, tmp_path):
    """A format jaxvi cannot read as data: from_dir loads the model to describe it."""
    fmt = hub.ModelFormat(
        name="nested",
        files=("weights/model.json", "weights/model.npz"),
        save=lambda m, d, ow: m.save(os.path.join(d, "weights"), overwrite=ow),
        load=lambda d, adata: jaxvi.SCVI.load(os.path.join(d, "weights"), adata=adata),
        library_name="nested-lib",
        versions=lambda m: {"nested_version": "1"},
    )
    hub.register_model_format(fmt)
    try:
        d = tmp_path / "nested"
        fmt.save(model, str(d), False)
        meta = HubMetadata.from_dir(str(d), ANNDATA_VERSION)
        assert meta.model_format == "nested"
        assert meta.model_cls_name == "SCVI"
        helper = HubModelCardHelper.from_dir(str(d), "mit", ANNDATA_VERSION)
        assert helper.model_init_params == model.init_params_
        assert _header(helper.model_card)["library_name"] == "nested-lib"
        h = HubModel(str(d), metadata=meta, model_card=helper)
        _same_latent(h.load_model(adata=model.adata.copy()), model)
    finally:
        hub.unregister_model_format("nested")
