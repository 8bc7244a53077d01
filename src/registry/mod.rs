//! Where leases live: etcd v3 (Flannel's etcd mode) or Kubernetes node annotations (kube
//! mode). The lease format itself is in `twill_formats::lease`.

pub mod etcd;
pub mod kube;
