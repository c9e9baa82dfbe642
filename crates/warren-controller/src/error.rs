//! Errors that fail a reconcile (and make `error_policy` back off).
//!
//! Broker failures are not among them: a failed queue read is an input of
//! the decision (hold, then fallback) and is reported in the status, not
//! retried with backoff. What fails a reconcile is the Kubernetes API
//! refusing a read or a write the controller cannot do without.

/// A failed reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the QueueScaler has no namespace")]
    MissingNamespace,
    #[error("cannot read the /scale of {target}: {source}")]
    GetScale {
        target: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot scale {target} to {replicas}: {source}")]
    PatchScale {
        target: String,
        replicas: i32,
        #[source]
        source: kube::Error,
    },
    #[error("cannot write the status of QueueScaler {namespace}/{name}: {source}")]
    PatchStatus {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// Short, bounded label for metrics (`result` of a reconcile).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::MissingNamespace => "missing_namespace",
            Error::GetScale { .. } => "get_scale_failed",
            Error::PatchScale { .. } => "patch_scale_failed",
            Error::PatchStatus { .. } => "patch_status_failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct() {
        let labels = [
            Error::MissingNamespace.metric_label(),
            Error::GetScale {
                target: "t".into(),
                source: kube::Error::LinesCodecMaxLineLengthExceeded,
            }
            .metric_label(),
            Error::PatchScale {
                target: "t".into(),
                replicas: 1,
                source: kube::Error::LinesCodecMaxLineLengthExceeded,
            }
            .metric_label(),
            Error::PatchStatus {
                namespace: "n".into(),
                name: "s".into(),
                source: kube::Error::LinesCodecMaxLineLengthExceeded,
            }
            .metric_label(),
        ];
        let unique: std::collections::HashSet<_> = labels.iter().collect();
        assert_eq!(unique.len(), labels.len());
    }
}
