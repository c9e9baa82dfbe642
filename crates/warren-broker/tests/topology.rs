//! The declared topology on the machine's RabbitMQ.

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use lapin::options::{
    BasicGetOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use warren_broker::{QueueType, Topology};
use warren_testkit::{ready_count, shared_amqp_url, unique_name};

/// A job that keeps failing (requeued again and again) is dead-lettered by
/// the quorum queue's delivery limit instead of looping forever.
#[tokio::test]
async fn a_job_that_keeps_failing_is_dead_lettered_after_the_delivery_limit() {
    let url = shared_amqp_url();
    let queue = unique_name("topology-limit");
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let topology = Topology::new(vec![queue.clone()], QueueType::Quorum);
    topology.declare(&connection).await.unwrap();
    topology
        .declare(&connection)
        .await
        .expect("declaring twice is a no-op");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    let mut deliveries = 0;
    for _ in 0..50 {
        match channel
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            Some(message) => {
                deliveries += 1;
                message
                    .delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
            None => {
                if ready_count(&url, &format!("{queue}.dead")).await.unwrap() == 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    assert_eq!(
        ready_count(&url, &format!("{queue}.dead")).await.unwrap(),
        1,
        "dead-lettered"
    );
    assert_eq!(ready_count(&url, &queue).await.unwrap(), 0);
    assert!(
        (5..=7).contains(&deliveries),
        "delivered {deliveries} times before dead-lettering"
    );
}

/// A queue that exists with other arguments is a clear error naming it.
#[tokio::test]
async fn a_conflicting_existing_queue_is_reported_by_name() {
    let url = shared_amqp_url();
    let queue = unique_name("topology-conflict");
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    Topology::new(vec![queue.clone()], QueueType::Classic)
        .declare(&connection)
        .await
        .unwrap();
    let err = Topology::new(vec![queue.clone()], QueueType::Quorum)
        .declare(&connection)
        .await
        .unwrap_err();
    assert_eq!(err.name, queue);
    assert!(
        err.to_string().contains("PRECONDITION_FAILED") || err.to_string().contains("inequivalent"),
        "{err}"
    );
}
