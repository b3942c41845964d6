use clap::Parser;

use calsync_common::config::ConfigError;
use calsync_common::{shutdown, telemetry};
use calsync_ingest::settings::IngestSettings;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let settings = IngestSettings::parse();
    let _telemetry = telemetry::init(settings.shared.telemetry.log_format, "calsync-ingest");
    let shutdown = shutdown::on_signal();
    match calsync_ingest::Application::build(settings, shutdown).await {
        Ok(app) => match app.run_until_stopped().await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "ingest stopped with an error");
                std::process::ExitCode::FAILURE
            }
        },
        Err(error) => {
            eprintln!("calsync-ingest: {error:#}");
            // 2 = refused to start: a required setting is missing or invalid (fail closed).
            std::process::ExitCode::from(if error.downcast_ref::<ConfigError>().is_some() { 2 } else { 1 })
        }
    }
}
