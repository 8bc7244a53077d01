//! Deployment artefacts live beside this crate (`Dockerfile` and `kube-flannel.yml` at the
//! repository root, `deploy/systemd/`, `deploy/cni/`, `deploy/install-cni.sh`); the crate exists
//! for `tests/manifest.rs`, which checks them against the code so a typo cannot ship, and
//! `tests/daemonset_lab.rs`, which runs kube-flannel.yml's DaemonSet from the built image
//! (`TWILL_IMAGE`) on a 3-node lab through a small kubelet of its own (`tests/kubelet/`).
