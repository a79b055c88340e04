//! The handle of a server running in a background task, shared by the coordinator, the teacher
//! worker's `TeacherService` and the trainer: a switch that asks it to stop, and its task to wait
//! on. Each service keeps its own error type and maps a failed task ([`JoinError`]) into it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::oneshot;
use tokio::task::{JoinError, JoinHandle};

/// Resolves when the [`ServerTask`] that handed it out is asked to stop, or dropped.
#[derive(Debug)]
pub struct StopSignal(oneshot::Receiver<()>);

impl Future for StopSignal {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // A dropped sender stops the server too.
        Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}

/// A server serving in a background task until asked to stop. Dropping the handle asks the server
/// to stop (and does not wait for it).
#[derive(Debug)]
pub struct ServerTask<E> {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), E>>>,
}

impl<E: Send + 'static> ServerTask<E> {
    /// Spawns `serve(stop)` on the current runtime; `stop` resolves when [`ServerTask::stop`] or
    /// [`ServerTask::shutdown`] is called or the handle is dropped.
    pub fn spawn<F, Fut>(serve: F) -> Self
    where
        F: FnOnce(StopSignal) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(serve(StopSignal(rx)));
        Self { stop: Some(tx), task: Some(task) }
    }

    /// Asks the server to stop; returns at once.
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Asks the server to stop and waits for its task: the server's own result, or the
    /// [`JoinError`] of a task that panicked or was cancelled.
    pub async fn shutdown(mut self) -> Result<Result<(), E>, JoinError> {
        self.stop();
        self.wait().await
    }

    /// Waits for the server's task without asking it to stop (it stops on its own signal).
    pub async fn wait(mut self) -> Result<Result<(), E>, JoinError> {
        match self.task.take() {
            Some(t) => t.await,
            None => Ok(Ok(())),
        }
    }
}

impl<E> Drop for ServerTask<E> {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_stops_and_returns_the_result() {
        let t: ServerTask<String> = ServerTask::spawn(|stop| async move {
            stop.await;
            Err("stopped".to_string())
        });
        assert_eq!(t.shutdown().await.unwrap(), Err("stopped".to_string()));
    }

    #[tokio::test]
    async fn dropping_the_handle_stops_the_server() {
        let (tx, rx) = oneshot::channel();
        let t: ServerTask<()> = ServerTask::spawn(|stop| async move {
            stop.await;
            let _ = tx.send(());
            Ok(())
        });
        drop(t);
        rx.await.expect("the server saw the stop signal");
    }

    #[tokio::test]
    async fn wait_does_not_stop_the_server() {
        let (go, gate) = oneshot::channel::<()>();
        let t: ServerTask<()> = ServerTask::spawn(|_stop| async move {
            let _ = gate.await;
            Ok(())
        });
        let waiting = tokio::spawn(t.wait());
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        go.send(()).unwrap();
        waiting.await.unwrap().unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_panicking_server_is_a_join_error() {
        let t: ServerTask<()> =
            ServerTask::spawn(|_stop| async move { panic!("a deliberate panic in a test server") });
        assert!(t.shutdown().await.unwrap_err().is_panic());
    }
}
