//! Where leases live: etcd v3 (Flannel's etcd mode). The lease format itself is in [`lease`].

pub mod etcd;
pub mod lease;
