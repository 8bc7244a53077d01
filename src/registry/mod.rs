//! Where leases live: etcd v3 (Flannel's etcd mode) or Kubernetes node annotations (kube
//! mode). The lease format itself is in [`lease`].

pub mod etcd;
pub mod kube;
pub mod lease;
