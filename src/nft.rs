//! twilld's handle on nftables: the shared runner of [`twill_nft`] (with its timeout), and the
//! one way twilld's async code calls it, on tokio's blocking pool, so that no async task waits
//! on an `nft` process. Effectors take a [`SharedNft`], which unit tests replace with a
//! [`twill_nft::RecordingNft`].

use std::sync::Arc;

pub use twill_nft::{Nft, NftError, NftRunner};

/// The runner twilld's effectors share.
pub type SharedNft = Arc<dyn NftRunner>;

/// The real `nft` binary with the default timeout.
pub fn runner() -> SharedNft {
    Arc::new(Nft::default())
}

/// Runs `f` (blocking nft calls through `nft`) on tokio's blocking pool and awaits it. A panic
/// in `f` is resumed here.
pub async fn off_runtime<T: Send + 'static>(
    nft: &SharedNft,
    f: impl FnOnce(&dyn NftRunner) -> Result<T, NftError> + Send + 'static,
) -> Result<T, NftError> {
    let nft = Arc::clone(nft);
    match tokio::task::spawn_blocking(move || f(nft.as_ref())).await {
        Ok(done) => done,
        Err(e) => match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => Err(NftError::Abandoned(e.to_string())),
        },
    }
}

/// A recording fake for unit tests of the effectors, and the same fake as their runner.
#[cfg(test)]
pub fn recording() -> (Arc<twill_nft::RecordingNft>, SharedNft) {
    let fake = Arc::new(twill_nft::RecordingNft::new());
    let nft: SharedNft = fake.clone();
    (fake, nft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_run_off_the_runtime_and_return_their_result() {
        let (fake, nft) = recording();
        fake.reply(Ok("listing".into()));
        let out = off_runtime(&nft, |n| n.run(&["list", "tables"], "")).await;
        assert_eq!(out.unwrap(), "listing");
        assert_eq!(fake.calls()[0].args, ["list", "tables"]);
    }
}
