"""Three clearly different domains of text, built from what ships with Python.

The balance-scope experiment (SPEC section 10; Qwen arXiv 2501.11873) needs data whose
documents come from distinct domains, so that experts can specialise by domain and a
balancer counting one domain at a time can forbid it. Nothing downloads: the domains
are cut from the interpreter's own files, deterministically.

  code        the standard library's Python modules with every docstring removed
              (ast.unparse of the module without them; comments go too): program text
  prose       English: the docstrings of those modules (one document per module, its
              docstrings in source order) and pydoc's topic pages (pydoc_data.topics)
  structured  tables: the Unicode character database (one document per block of 256
              code points, a tab-separated line per named character: code point, name,
              category, bidirectional class, decomposition) and the HTML5 named
              entities (JSON lines, 256 a document)

Each domain is written as one JSONL file ({"text": ...} a line) and prepared like any
input (data.prepare). Each is capped at `max_bytes` of text (documents in file order).
"""

from __future__ import annotations

import ast
import html.entities
import json
import os
import sys
import unicodedata
import warnings

DOMAINS = ("code", "prose", "structured")
VERSION = "1"   # bump when what a domain holds changes (the prepared cache's key)


def _modules():
  from deepseek_jax.data.inputs import stdlib_files
  for path in stdlib_files():
    try:
      with open(path, encoding="utf-8") as fh:
        source = fh.read()
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield path, ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError):
      continue


def _docstring_nodes(tree):
  """(docstring Expr nodes, their texts) of a module, its classes and functions."""
  nodes = [tree] + [n for n in ast.walk(tree)
                    if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
  out = []
  for node in nodes:
    body = getattr(node, "body", [])
    if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)):
      out.append((node, body[0]))
  return out


def code_documents():
  for path, tree in _modules():
    for node, doc in _docstring_nodes(tree):
      node.body.remove(doc)
      if not node.body:
        node.body.append(ast.Pass())
    try:
      text = ast.unparse(tree)
    except (ValueError, RecursionError):
      continue
    if text.strip():
      yield text + "\n"


def prose_documents():
  for _, tree in _modules():
    texts = [ast.get_docstring(node) or "" for node, _ in _docstring_nodes(tree)]
    text = "\n\n".join(t for t in texts if t.strip())
    if len(text) >= 200:
      yield text + "\n"
  try:
    from pydoc_data import topics
    for name in sorted(topics.topics):
      yield topics.topics[name]
  except ImportError:
    pass


def structured_documents():
  for block in range(0, sys.maxunicode + 1, 256):
    lines = []
    for cp in range(block, block + 256):
      name = unicodedata.name(chr(cp), "")
      if name:
        lines.append(f"U+{cp:04X}\t{name}\t{unicodedata.category(chr(cp))}\t"
                     f"{unicodedata.bidirectional(chr(cp))}\t"
                     f"{unicodedata.decomposition(chr(cp))}")
    if lines:
      yield "\n".join(lines) + "\n"
  entities = sorted(html.entities.html5.items())
  for i in range(0, len(entities), 256):
    yield "".join(json.dumps({"entity": k, "text": v, "codepoints": [ord(c) for c in v]})
                  + "\n" for k, v in entities[i:i + 256])


BUILDERS = {"code": code_documents, "prose": prose_documents,
            "structured": structured_documents}


def write_domain(name: str, path: str, max_bytes: int) -> int:
  """Writes domain `name` as JSONL to path (atomically); returns the documents written."""
  n, size = 0, 0
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as fh:
    for text in BUILDERS[name]():
      if size >= max_bytes:
        break
      text = text[:max_bytes - size]
      fh.write(json.dumps({"text": text}) + "\n")
      n, size = n + 1, size + len(text.encode("utf-8"))
  os.replace(tmp, path)
  return n
