//! The signal that the agent drains: listeners stop accepting and keep-alive connections close
//! after the request in flight.

use tokio::sync::watch;

/// Completes once `draining` turns true (never if its sender is gone without that).
pub async fn drain_started(draining: &mut watch::Receiver<bool>) {
    if draining.wait_for(|d| *d).await.is_err() {
        std::future::pending::<()>().await;
    }
}
