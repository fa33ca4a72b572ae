#!/usr/bin/env bash
# The commit this source tree was taken from, for the banners of the GPU scripts: the short HEAD
# when the tree is its own git checkout, with "-dirty" when tracked files differ from it (a tree
# copied over an older checkout then says so instead of naming the old commit alone, and adds
# the COMMIT file's commit when there is one); else the
# contents of a COMMIT file at its root (write one
# when the tree is an export, e.g. `git archive HEAD | tar -x -C DIR && git rev-parse --short HEAD
# > DIR/COMMIT`); else "?".  (An export inside another checkout must not report that checkout's
# HEAD, which `git rev-parse` alone would.)
root=$(cd "$(dirname "$0")/.." && pwd -P)
top=$(git -C "$root" rev-parse --show-toplevel 2>/dev/null || true)
if [ -n "$top" ] && [ "$(cd "$top" && pwd -P)" = "$root" ]; then
  id=$(git -C "$root" describe --always --dirty --abbrev=7)
  # A dirty tree with a COMMIT file: either may be the stale one (a working tree copied over an
  # older checkout with its COMMIT written just before, as the GPU runs do; or an old COMMIT
  # left in a checkout), so both are named.
  if [ "${id%-dirty}" != "$id" ] && [ -s "$root/COMMIT" ]; then
    echo "$id (COMMIT file: $(head -c 40 "$root/COMMIT" | tr -d '\n'))"
  else
    echo "$id"
  fi
elif [ -s "$root/COMMIT" ]; then
  head -c 40 "$root/COMMIT" | tr -d '\n'
  echo
else
  echo '?'
fi
