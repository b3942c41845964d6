//! `calsync-worker dead-letter-policy`: the RabbitMQ policy that expires dead letters in
//! `calsync.dead` after `DEAD_RETENTION_DAYS` (ARCHITECTURE.md, "Retention").
//!
//! Why a policy and not a queue argument: redeclaring an existing queue with a new
//! `x-message-ttl` fails with `PRECONDITION_FAILED`, so an argument would reach new deployments only;
//! a policy applies to a queue that already exists, and RabbitMQ's docs recommend policies for
//! TTLs (quorum queues honour `message-ttl` since 3.10). Policies cannot be set over AMQP, so
//! calsync prints the command for the operator to run once (and again after changing
//! `DEAD_RETENTION_DAYS`).
//!
//! Measured on 3.10.8: a quorum queue stamps the TTL on a message when it is enqueued, and expires
//! only from its head. Letters that were already dead before the policy never expire, and while one
//! sits at the head the ones behind it wait too; the README says to `replay-dead` them once.

use std::time::Duration;

use calsync_common::queue::topology::Topology;

/// RabbitMQ takes a message TTL of at most 2^32 − 1 milliseconds (about 49 days).
const MAX_TTL_MS: u128 = u32::MAX as u128;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "RabbitMQ cannot expire messages after {0} days (at most 49); lower DEAD_RETENTION_DAYS or keep \
         dead letters by hand"
    )]
    TooLong(u64),
    #[error("AMQP_URL is not a URL: {0}")]
    BadUrl(String),
}

/// The policy for `topology`'s `calsync.dead` in `vhost`, as `rabbitmqctl` arguments.
pub fn rabbitmqctl_args(topology: &Topology, vhost: &str, ttl: Duration) -> Result<Vec<String>, PolicyError> {
    if ttl.as_millis() > MAX_TTL_MS {
        return Err(PolicyError::TooLong(ttl.as_secs() / 86_400));
    }
    let queue = topology.dead_queue();
    Ok(vec![
        "set_policy".into(),
        "-p".into(),
        vhost.into(),
        queue.replace('.', "-"),
        format!("^{}$", queue.replace('.', "\\.")),
        format!(r#"{{"message-ttl":{}}}"#, ttl.as_millis()),
        "--apply-to".into(),
        "queues".into(),
    ])
}

/// The vhost an AMQP URL names (`/` when it names none).
pub fn vhost_of(amqp_url: &str) -> Result<String, PolicyError> {
    let first = amqp_url.split(',').next().unwrap_or_default().trim();
    let url = url::Url::parse(first).map_err(|e| PolicyError::BadUrl(e.to_string()))?;
    let path = url.path().trim_start_matches('/');
    let vhost = percent_decode(path);
    Ok(if vhost.is_empty() { "/".into() } else { vhost })
}

fn percent_decode(text: &str) -> String {
    url::form_urlencoded::parse(format!("v={}", text.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// `args` as one line a shell runs as written.
pub fn shell_line(args: &[String]) -> String {
    let quote = |arg: &String| {
        if arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=".contains(c)) {
            arg.clone()
        } else {
            format!("'{}'", arg.replace('\'', r"'\''"))
        }
    };
    std::iter::once("rabbitmqctl".to_owned()).chain(args.iter().map(quote)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thirty_days_of_dead_letters_on_the_default_vhost() {
        let args = rabbitmqctl_args(&Topology::new(""), "/", Duration::from_secs(30 * 86_400)).unwrap();
        assert_eq!(
            shell_line(&args),
            r#"rabbitmqctl set_policy -p / calsync-dead '^calsync\.dead$' '{"message-ttl":2592000000}' --apply-to queues"#
        );
    }

    #[test]
    fn fifty_days_are_refused_with_the_reason() {
        let error = rabbitmqctl_args(&Topology::new(""), "/", Duration::from_secs(50 * 86_400)).unwrap_err();
        assert!(error.to_string().contains("at most 49"), "{error}");
    }

    #[test]
    fn the_vhost_comes_from_the_first_url_decoded() {
        assert_eq!(vhost_of("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap(), "/");
        assert_eq!(vhost_of("amqp://127.0.0.1:5672").unwrap(), "/");
        assert_eq!(vhost_of("amqp://a:5672/ci-1,amqp://b:5672/ci-1").unwrap(), "ci-1");
        assert_eq!(vhost_of("amqp://a:5672/a%20b+c").unwrap(), "a b+c");
    }
}
