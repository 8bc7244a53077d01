//! The one Kubernetes client builder of twilld (`--kube-subnet-mgr`) and twill-policy's API
//! source: from a kubeconfig file and/or an explicit API server URL, else the in-cluster
//! service-account config, as client-go's `BuildConfigFromFlags` does.

use std::time::Duration;

use kube::config::{InClusterError, KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::{Client, Config};

/// Where the API server is and how long to wait for it.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// The API server URL; overrides the kubeconfig's server when both are given.
    pub api_url: String,
    /// A kubeconfig file; its current context is used.
    pub kubeconfig: String,
    /// Connect timeout of every call; `None` keeps kube's default (30 s).
    pub connect_timeout: Option<Duration>,
    /// Longest silence on a response before the connection is dropped; `None` keeps kube's
    /// default (none). When set, it is counted from the request, not from when a pooled
    /// connection went idle (kube's `reset_reader_on_write`).
    pub read_timeout: Option<Duration>,
}

/// Why no client could be built. Each message is the underlying error's own, so logs read
/// as they did when each program built its client itself.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Kubeconfig(#[from] KubeconfigError),
    #[error(transparent)]
    InCluster(#[from] InClusterError),
    #[error(transparent)]
    ApiUrl(#[from] http::uri::InvalidUri),
    #[error(transparent)]
    Client(#[from] kube::Error),
}

/// The client configuration `opts` describe (reads the kubeconfig or the in-cluster files).
pub async fn config(opts: &ClientOptions) -> Result<Config, ClientError> {
    let mut config = if !opts.kubeconfig.is_empty() {
        let kc = Kubeconfig::read_from(&opts.kubeconfig)?;
        Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
    } else if !opts.api_url.is_empty() {
        Config::new(opts.api_url.parse()?)
    } else {
        Config::incluster()?
    };
    if !opts.api_url.is_empty() {
        config.cluster_url = opts.api_url.parse()?;
    }
    if let Some(t) = opts.connect_timeout {
        config.connect_timeout = Some(t);
    }
    if let Some(t) = opts.read_timeout {
        config.read_timeout = Some(t);
        config.reset_reader_on_write = true;
    }
    Ok(config)
}

/// A client for `opts` (see [`config`]). Nothing is sent to the server yet.
pub async fn client(opts: &ClientOptions) -> Result<Client, ClientError> {
    Ok(Client::try_from(config(opts).await?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kubeconfig(dir: &std::path::Path) -> String {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters:\n- name: k\n  cluster:\n    server: https://192.0.2.1:6443\n    insecure-skip-tls-verify: true\ncontexts:\n- name: c\n  context:\n    cluster: k\n    user: u\nusers:\n- name: u\n  user:\n    token: t\n",
        )
        .unwrap();
        path.to_string_lossy().into_owned()
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("twill-runtime-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn api_url_alone_with_the_timeouts_given() {
        let c = config(&ClientOptions {
            api_url: "http://192.0.2.7:8080".into(),
            connect_timeout: Some(Duration::from_secs(10)),
            read_timeout: Some(Duration::from_secs(75)),
            ..ClientOptions::default()
        })
        .await
        .unwrap();
        assert_eq!(c.cluster_url.to_string(), "http://192.0.2.7:8080/");
        assert_eq!(c.connect_timeout, Some(Duration::from_secs(10)));
        assert_eq!(c.read_timeout, Some(Duration::from_secs(75)));
        assert!(c.reset_reader_on_write);
        client(&ClientOptions {
            api_url: "http://192.0.2.7:8080".into(),
            ..ClientOptions::default()
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn no_timeouts_given_keeps_kubes_defaults() {
        let c = config(&ClientOptions {
            api_url: "http://192.0.2.7:8080".into(),
            ..ClientOptions::default()
        })
        .await
        .unwrap();
        let kube_default = Config::new("http://192.0.2.7:8080".parse().unwrap());
        assert_eq!(c.connect_timeout, kube_default.connect_timeout);
        assert_eq!(c.read_timeout, kube_default.read_timeout);
        assert!(!c.reset_reader_on_write);
    }

    #[tokio::test]
    async fn api_url_overrides_the_kubeconfigs_server() {
        let dir = temp_dir("override");
        let kc = kubeconfig(&dir);
        let c = config(&ClientOptions {
            kubeconfig: kc.clone(),
            ..ClientOptions::default()
        })
        .await
        .unwrap();
        assert_eq!(c.cluster_url.to_string(), "https://192.0.2.1:6443/");
        let c = config(&ClientOptions {
            kubeconfig: kc,
            api_url: "https://192.0.2.9:443".into(),
            ..ClientOptions::default()
        })
        .await
        .unwrap();
        assert_eq!(c.cluster_url.to_string(), "https://192.0.2.9:443/");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn errors_are_kubes_own() {
        let missing = "/nonexistent/twill-runtime/kubeconfig";
        let e = config(&ClientOptions {
            kubeconfig: missing.into(),
            ..ClientOptions::default()
        })
        .await
        .unwrap_err();
        let kube_own = Kubeconfig::read_from(missing).unwrap_err();
        assert!(matches!(e, ClientError::Kubeconfig(_)), "{e:?}");
        assert_eq!(e.to_string(), kube_own.to_string());
        let e = config(&ClientOptions {
            api_url: "http://bad url".into(),
            ..ClientOptions::default()
        })
        .await
        .unwrap_err();
        assert!(matches!(e, ClientError::ApiUrl(_)), "{e:?}");
    }
}
