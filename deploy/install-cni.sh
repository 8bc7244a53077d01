#!/bin/sh
# Init-container step of kube-flannel.yml: installs the CNI config and any reference plugin the
# node lacks, each atomically (temp file in the same directory, then rename), so the kubelet never
# reads a half-written file. Existing plugins are left alone: the node's own versions win.
#   install-cni.sh <conflist source> <conflist target> <plugin dir>
# The image also has it as /opt/bin/install-conf, which Flannel's own DaemonSet (v0.28.6 on)
# runs with two arguments, <source> <target>: then it installs the config alone, as Flannel's
# install-conf does, so a Flannel DaemonSet with only its image changed to twill's works.
set -eu
if [ $# -ne 2 ] && [ $# -ne 3 ]; then
  echo "usage: $0 <conflist source> <conflist target> [<plugin dir>]" >&2
  exit 1
fi
src="$1"; dst="$2"; bindir="${3:-}"

tmp="$(dirname "$dst")/.$(basename "$dst").tmp$$"
cp "$src" "$tmp"
mv -f "$tmp" "$dst"
echo "installed $dst"

[ -n "$bindir" ] || exit 0
for p in bridge host-local portmap loopback; do
  if [ ! -e "$bindir/$p" ]; then
    cp "/opt/cni/plugins/$p" "$bindir/.$p.tmp$$"
    mv -f "$bindir/.$p.tmp$$" "$bindir/$p"
    echo "installed missing CNI plugin $bindir/$p"
  fi
done
