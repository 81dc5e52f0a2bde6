"""Re-point the line links of docs pages at the current lines of the names they show: python docs/relink.py docs/*.md README.md"""
import re, sys
from pathlib import Path
LINK = re.compile(r"\[([^\[\]]*)\]\((\.\./(\w+\.py))#L(\d+)(?:-L(\d+))?\)")
NAME = re.compile(r"`([^`]+)`")

def indent(line): return len(line) - len(line.lstrip())

def locate(src, name):
    if re.fullmatch(r"\w+", name):
        pats = [rf"^\s*(def|class) {name}\b", rf"^\s*{name}\s*=", rf"^\s*(?:\w+\s*,\s*)*{name}\b.*="]
        for pat in pats:
            for i, l in enumerate(src):
                if re.search(pat, l): return i
    for i, l in enumerate(src):
        if name in l: return i
    raise SystemExit(f"not found: {name}")

def extent(src, i):
    base = indent(src[i]); comment = src[i].lstrip().startswith("#")
    j = i + 1
    while j < len(src):
        l = src[j]
        if not l.strip():
            if comment: break
            j += 1; continue
        if comment:
            if indent(l) < base or (indent(l) == base and re.match(r"\s*# (COMMON|METHOD)", l)): break
        elif indent(l) <= base and not l.lstrip().startswith((")", "]", "}")): break
        j += 1
    while not src[j - 1].strip(): j -= 1
    return i + 1, j

for page in sys.argv[1:]:
    page = Path(page); text = page.read_text()
    def fix(m):
        label, rel, fname, a, b = m.groups()
        src = (page.parent / rel).resolve().read_text().splitlines()
        name = NAME.findall(label)[0]
        i = locate(src, name)
        if b is None:
            return f"[{label}]({rel}#L{i + 1})"
        first, last = extent(src, i)
        label = re.sub(r"(lines?\s+)(\d+)(-\d+)?", lambda k: f"{k[1]}{first}-{last}", label, count=1)
        return f"[{label}]({rel}#L{first}-L{last})"
    new = LINK.sub(fix, text)
    page.write_text(new)
