"""The user docs stay true: docs/cli.md's command-line reference cannot drift from the absl flag
definitions, README stays a short front page, and every link between the docs resolves."""

import re
import subprocess
import sys

from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_cli_reference_matches_flags():
  r = subprocess.run([sys.executable, "-m", "xraytpu.docs", "--check"], capture_output=True,
                     text=True, cwd=ROOT, timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr


def test_every_entry_point_is_documented():
  from xraytpu import docs
  cli = docs.CLI_DOC.read_text()
  for module, _ in docs.ENTRY_POINTS:
    assert f"### `python -m {module}`" in cli


def test_check_fails_on_a_changed_flag_help_until_written(tmp_path, monkeypatch, capsys):
  """--check compares the whole generated section: one changed help line makes it exit 1,
  --write fixes it and leaves the hand-written text around the markers alone."""
  from xraytpu import docs
  helps = {m: f"  --{m.rsplit('.', 1)[1]}_flag: what it does.\n    (default: '1')"
           for m, _ in docs.ENTRY_POINTS}
  monkeypatch.setattr(docs, "flag_help", lambda module: helps[module])
  doc = tmp_path / "cli.md"
  doc.write_text(f"# Reference\n\nHand-written intro.\n\n{docs.reference()}\n\nHand-written tail.\n")
  assert docs.main(["--check"], doc) == 0

  helps["xraytpu.train"] = helps["xraytpu.train"].replace("what it does", "what it does now")
  assert docs.main(["--check"], doc) == 1
  assert "stale" in capsys.readouterr().err

  assert docs.main(["--write"], doc) == 0
  assert docs.main(["--check"], doc) == 0
  text = doc.read_text()
  assert "what it does now" in text
  assert text.startswith("# Reference\n\nHand-written intro.\n\n<!-- cli-reference:begin")
  assert text.endswith("<!-- cli-reference:end -->\n\nHand-written tail.\n")

  doc.write_text("# Reference without the markers\n")
  assert docs.main(["--check"], doc) == 1
  assert "markers" in capsys.readouterr().err


def test_readme_is_a_short_front_page():
  lines = (ROOT / "README.md").read_text().splitlines()
  assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail under docs/"


def _anchors(markdown: str) -> set[str]:
  """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
  out = set()
  text = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
  for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    out.add(slug)
  return out


def test_links_between_docs_resolve():
  bad = []
  for doc in DOCS:
    text = doc.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"[a-z]+:", target):
        continue   # http(s), mailto
      path, _, anchor = target.partition("#")
      dest = (doc.parent / path).resolve() if path else doc
      if not dest.exists():
        bad.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
      elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
        bad.append(f"{doc.relative_to(ROOT)}: {target} (no such heading)")
  assert not bad, "\n".join(bad)


def test_no_internal_issue_numbers_in_user_docs():
  for doc in DOCS:
    found = re.findall(r"[^\n]*\bissues? \d+[^\n]*", doc.read_text(), flags=re.I)
    assert not found, f"{doc.relative_to(ROOT)}: {found}"
