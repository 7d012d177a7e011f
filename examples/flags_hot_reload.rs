//! Change migration flags at runtime from a JSON file, watch routing follow, then pull the
//! kill switch.
//!
//! ```text
//! cargo run --example flags_hot_reload
//! ```
//!
//! The selector polls the file; a tick that already resolved its sources is not disturbed by a
//! change. The kill switch sends every bot back to legacy at once and latches: edits to the
//! file are stored but not applied until `resume()`.

use std::{error::Error, sync::Arc, time::Duration};

use tickshare::{
    BatchEvaluator, Bot, CoordinatedSource, DirectSource, MarketDataSource, MigrationFlags,
    MovingAverageCrossover, SourceSelector, sim::SimExchange,
};

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> Result<(), Box<dyn Error>> {
    let sim = SimExchange::builder().products(10).start().await?;
    let client = sim.client()?;
    let limiter = client.rate_limiter().cloned().ok_or("the client has a rate limiter by default")?;
    let coordinated = CoordinatedSource::coinbase(client).clock(sim.clock()).build()?;
    // Legacy bots draw from the same budget, so a migration in progress draws no 429.
    let legacy = DirectSource::new(sim.client_builder().rate_limiter(limiter).build()?);
    let selector = SourceSelector::new(
        Arc::new(legacy) as Arc<dyn MarketDataSource>,
        Arc::new(coordinated) as Arc<dyn MarketDataSource>,
        MigrationFlags::default(),
    );
    let bots: Vec<Bot> = (0..20)
        .map(|i| {
            let p = sim.products()[i % 10].clone();
            Bot::new(format!("bot-{i:02}"), p, Arc::new(MovingAverageCrossover::default()))
        })
        .collect();
    let ids: Vec<String> = bots.iter().map(|b| b.id.clone()).collect();
    let eval = BatchEvaluator::with_selector(selector.clone()).clock(sim.clock());

    let dir = std::env::temp_dir().join(format!("tickshare-flags-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("flags.json");
    std::fs::write(&path, r#"{"enabled": false}"#)?;
    let _watcher = selector.watch_file(&path, Duration::from_secs(1));

    let steps: [(&str, &str); 4] = [
        ("switch on, two bots allow-listed", r#"{"enabled": true, "bot_ids": ["bot-00", "bot-01"]}"#),
        ("25 % rollout", r#"{"enabled": true, "bot_ids": ["bot-00", "bot-01"], "rollout_percent": 25}"#),
        ("100 % rollout", r#"{"enabled": true, "rollout_percent": 100}"#),
        ("a typo in the file (kept the previous flags)", r#"{"enabled": tru"#),
    ];
    let show = |label: &str| {
        let p = selector.migration_progress(&ids);
        println!(
            "{label:<48} migrated {:>2}/{} ({:>5.1} %)",
            p.bots_migrated, p.total_bots, p.migration_percentage
        );
    };
    show("start (flags file: switch off)");
    for (label, json) in steps {
        std::fs::write(&path, json)?;
        tokio::time::sleep(Duration::from_secs(2)).await; // the watcher polls every second
        let report = eval.evaluate_all(&bots).await;
        show(label);
        println!("{:<48} tick routes {:?}, errors {}", "", report.routes, report.errors().count());
    }
    selector.kill_switch();
    show("kill switch");
    std::fs::write(&path, r#"{"enabled": true, "rollout_percent": 100}"#)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    show("file edited during the incident (latched)");
    selector.resume();
    show("resume()");
    println!("\nselector stats: {}", serde_json::to_string(&selector.stats())?);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
