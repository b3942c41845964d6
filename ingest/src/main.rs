use clap::Parser;

use calsync_common::config::IngestSettings;
use calsync_common::{shutdown, telemetry};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let settings = IngestSettings::parse();
    if let Err(error) = settings.validate() {
        eprintln!("calsync-ingest: {error}");
        return std::process::ExitCode::from(2);
    }
    telemetry::init_tracing(settings.telemetry.log_format);
    let shutdown = shutdown::on_signal();
    match calsync_ingest::Application::build(settings, shutdown.clone()).await {
        Ok(app) => match app.run_until_stopped().await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "ingest stopped with an error");
                std::process::ExitCode::FAILURE
            }
        },
        Err(error) => {
            eprintln!("calsync-ingest: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
