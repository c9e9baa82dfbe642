//! Taking jobs from several queues in turn.
//!
//! The worker has one consumer per queue. Each consumer's stream holds what
//! the broker pushed to it (at most the prefetch). [`Fair`] takes the next
//! item round-robin: after an item from stream `i`, stream `i + 1` is asked
//! first, so a queue with a flood of jobs gets at most one turn between two
//! turns of any other queue that has a job waiting. A stream with nothing
//! ready is skipped, never waited for.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;

/// What the next poll of [`Fair`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Turn<T> {
    /// Stream `index` had an item.
    Item { index: usize, item: T },
    /// Stream `index` ended (a consumer the broker cancelled, or whose
    /// cancel this worker asked for). It is not polled again.
    Ended { index: usize },
}

/// Several streams read in turn (see the module docs).
pub struct Fair<S> {
    streams: Vec<Option<S>>,
    /// The stream asked first at the next poll.
    next: usize,
}

impl<S: Stream + Unpin> Fair<S> {
    pub fn new(streams: Vec<S>) -> Self {
        Self {
            streams: streams.into_iter().map(Some).collect(),
            next: 0,
        }
    }

    /// Streams that have not ended.
    pub fn open(&self) -> usize {
        self.streams.iter().filter(|s| s.is_some()).count()
    }

    /// The next item (or end) from the streams, in turn. Pending while no
    /// stream has one; `None` once every stream has ended. Cancel-safe: an
    /// item is only taken from a stream when it is returned.
    pub async fn next(&mut self) -> Option<Turn<S::Item>> {
        futures::future::poll_fn(|cx| self.poll_turn(cx)).await
    }

    fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<Option<Turn<S::Item>>> {
        let count = self.streams.len();
        if self.open() == 0 {
            return Poll::Ready(None);
        }
        for step in 0..count {
            let index = (self.next + step) % count;
            let Some(stream) = self.streams[index].as_mut() else {
                continue;
            };
            match Pin::new(stream).poll_next(cx) {
                Poll::Pending => {}
                Poll::Ready(Some(item)) => {
                    self.next = (index + 1) % count;
                    return Poll::Ready(Some(Turn::Item { index, item }));
                }
                Poll::Ready(None) => {
                    self.streams[index] = None;
                    return Poll::Ready(Some(Turn::Ended { index }));
                }
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::stream::{self, BoxStream, StreamExt};

    fn numbered(queue: usize, n: usize) -> BoxStream<'static, (usize, usize)> {
        stream::iter((0..n).map(move |i| (queue, i))).boxed()
    }

    fn item(index: usize, item: (usize, usize)) -> Option<Turn<(usize, usize)>> {
        Some(Turn::Item { index, item })
    }

    async fn take_items(
        fair: &mut Fair<BoxStream<'static, (usize, usize)>>,
    ) -> Vec<(usize, usize)> {
        let mut items = Vec::new();
        while let Some(turn) = fair.next().await {
            if let Turn::Item { item, .. } = turn {
                items.push(item);
            }
        }
        items
    }

    #[tokio::test]
    async fn a_flood_gets_one_turn_between_turns_of_the_others() {
        let mut fair = Fair::new(vec![numbered(0, 10), numbered(1, 2), numbered(2, 3)]);
        let queues: Vec<usize> = take_items(&mut fair)
            .await
            .iter()
            .map(|(q, _)| *q)
            .collect();
        assert_eq!(queues, vec![0, 1, 2, 0, 1, 2, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[tokio::test]
    async fn each_stream_keeps_its_own_order_and_nothing_is_lost() {
        let mut fair = Fair::new(vec![numbered(0, 4), numbered(1, 0), numbered(2, 6)]);
        let items = take_items(&mut fair).await;
        assert_eq!(items.len(), 10);
        for queue in [0, 2] {
            let order: Vec<usize> = items
                .iter()
                .filter(|(q, _)| *q == queue)
                .map(|(_, i)| *i)
                .collect();
            assert_eq!(order, (0..order.len()).collect::<Vec<_>>(), "queue {queue}");
        }
        assert_eq!(fair.open(), 0);
    }

    #[tokio::test]
    async fn a_stream_with_nothing_ready_is_skipped_not_waited_for() {
        let (_tx, idle) = futures::channel::mpsc::unbounded::<(usize, usize)>();
        let mut fair = Fair::new(vec![idle.boxed(), numbered(1, 2)]);
        assert_eq!(fair.next().await, item(1, (1, 0)));
        assert_eq!(fair.next().await, item(1, (1, 1)));
        assert_eq!(fair.next().await, Some(Turn::Ended { index: 1 }));
        assert_eq!(fair.open(), 1, "the idle stream is still open");
        let pending = tokio::time::timeout(std::time::Duration::from_millis(50), fair.next()).await;
        assert!(pending.is_err(), "nothing ready: the poll waits");
    }

    #[tokio::test]
    async fn a_late_item_on_a_skipped_stream_gets_the_next_turn() {
        let (tx, late) = futures::channel::mpsc::unbounded::<(usize, usize)>();
        let mut fair = Fair::new(vec![numbered(0, 5), late.boxed()]);
        assert_eq!(fair.next().await, item(0, (0, 0)));
        // Stream 1 had nothing: stream 0 takes the turn again.
        assert_eq!(fair.next().await, item(0, (0, 1)));
        tx.unbounded_send((1, 0)).unwrap();
        assert_eq!(fair.next().await, item(1, (1, 0)));
        assert_eq!(fair.next().await, item(0, (0, 2)));
    }
}
