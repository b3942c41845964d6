//! `calendly-sim load`: books, cancels and reschedules at a steady rate for simulated users whose
//! user-scoped subscriptions point at `target`, so every action becomes signed webhooks.

use std::time::{Duration, Instant};

use serde::Serialize;
use uuid::Uuid;

use crate::model::Uris;
use crate::sim::{Booking, Cancellation, NewInvitee, NewUser, Sim};

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub users: usize,
    /// Actions per second (each is one or two webhooks).
    pub rate: f64,
    pub duration: Duration,
    /// Webhook callback URL, e.g. `http://127.0.0.1:8080/webhooks/calendly`.
    pub target: String,
}

#[derive(Debug, Default, Serialize)]
pub struct LoadReport {
    pub users: usize,
    pub booked: u64,
    pub canceled: u64,
    pub rescheduled: u64,
    pub webhooks_generated: u64,
    pub deliveries_succeeded: u64,
    pub delivery_attempts_failed: u64,
    pub seconds: f64,
}

/// Creates `users` users (each subscribed to `target`), then generates load.
pub async fn run(sim: &Sim, options: &LoadOptions) -> anyhow::Result<LoadReport> {
    let mut users = Vec::new();
    for n in 0..options.users {
        let user = sim
            .create_user(NewUser {
                name: format!("Load User {n}"),
                email: format!("load{n}@example.com"),
                organization: None,
                webhooks_enabled: true,
                plan: crate::model::Plan::Paid,
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let uri = user["uri"].as_str().unwrap_or_default().to_owned();
        sim.subscribe(&uri, &options.target).map_err(|e| anyhow::anyhow!("{e}"))?;
        users.push(Uris::id_of(&uri).expect("sim user uri ends in a uuid"));
    }
    let baseline = sim.counters().deliveries_succeeded;
    let mut report = LoadReport { users: users.len(), ..LoadReport::default() };
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / options.rate.max(0.001)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut n: u64 = 0;
    while started.elapsed() < options.duration {
        ticker.tick().await;
        n += 1;
        let user = users[(n as usize) % users.len()];
        act(sim, user, n, &mut report);
    }
    // Let in-flight deliveries land (bounded).
    let deadline = Instant::now() + Duration::from_secs(30);
    while sim.counters().deliveries_succeeded - baseline < report.webhooks_generated && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let counters = sim.counters();
    report.deliveries_succeeded = counters.deliveries_succeeded - baseline;
    report.delivery_attempts_failed = counters.delivery_attempts_failed;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// 60% bookings, 25% cancellations, 15% reschedules (bookings when nothing is left to change).
fn act(sim: &Sim, user: Uuid, n: u64, report: &mut LoadReport) {
    let roll = n % 20;
    let active = if roll >= 12 { sim.active_invitees(user) } else { Vec::new() };
    if let Some(&invitee) = active.get((n as usize) % active.len().max(1)) {
        if roll < 17 {
            if sim.cancel(invitee, Cancellation { reason: Some("load test".into()), ..Cancellation::default() }).is_ok()
            {
                report.canceled += 1;
                report.webhooks_generated += 1;
            }
        } else if sim.reschedule(invitee, None).is_ok() {
            report.rescheduled += 1;
            report.webhooks_generated += 2;
        }
        return;
    }
    let booking = Booking {
        user: user.to_string(),
        name: Some(format!("Load meeting {n}")),
        start_time: None,
        duration_minutes: Some(30),
        invitees: vec![NewInvitee { name: format!("Guest {n}"), email: format!("guest{n}@example.com") }],
        location: None,
        co_hosts: Vec::new(),
        webhook_lost: false,
    };
    if sim.book(booking).is_ok() {
        report.booked += 1;
        report.webhooks_generated += 1;
    }
}
