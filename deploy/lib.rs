//! Deployment artefacts live beside this crate (`Dockerfile` and `kube-flannel.yml` at the
//! repository root, `deploy/systemd/`, `deploy/cni/`, `deploy/install-cni.sh`); the crate exists
//! for `tests/manifest.rs`, which checks them against the code so a typo cannot ship.
