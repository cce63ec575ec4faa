//! Search benchmark: index `--messages` messages in one room (through the
//! real host sequencer, so the index is written with each event), then time
//! `--queries` searches. The bound, in the same run: each query's answer
//! built without the index, its messages read one by one at the seqs the
//! search returned (`views::messages` from `seq - 1`, limit 1), which is
//! what any search must do to answer. Prints one JSON line:
//! `{"messages","queries","p50_ms","p99_ms","mean_ms","results_mean",
//! "bound_p50_ms","bound_p99_ms","bound_mean_ms","ratio_p99","ratio_mean"}`.
//!
//! ```text
//! cargo run --release --example searchbench -- --messages 100000 --queries 200
//! ```

use std::time::{Duration, Instant};

use clap::Parser;
use rand::{Rng, SeedableRng};
use scaiwave::config::StorageSync;
use scaiwave::ids::RoomId;
use scaiwave::protocol::event::Content;
use scaiwave::rooms::host::{self, Source};
use scaiwave::rooms::{commands, search, views};

#[allow(dead_code)]
mod common;
use common::{one_room, round3, OneRoom};

// The same allocator as the shipped binary, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    #[arg(long, default_value_t = 200)]
    queries: usize,
}

/// Words drawn with a skewed distribution, like chat: a few common, many rare.
const VOCABULARY: usize = 20_000;
const WORDS_PER_MESSAGE: usize = 12;

fn word(rng: &mut impl Rng) -> String {
    let r: f64 = rng.random();
    format!("w{}", (r * r * r * VOCABULARY as f64) as usize)
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let OneRoom {
            app,
            reader,
            fqid: sender,
            room_id,
            ..
        } = one_room("bench", StorageSync::default()).await?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let started = Instant::now();
        let mut done = 0;
        while done < args.messages {
            let n = (args.messages - done).min(100);
            let batch = (0..n)
                .map(|_| {
                    let body: Vec<String> =
                        (0..WORDS_PER_MESSAGE).map(|_| word(&mut rng)).collect();
                    let content = Content::Message {
                        body: body.join(" "),
                        thread_root: None,
                        reply_to: None,
                        mentions: vec![],
                    };
                    (
                        commands::sign(&app.first.rooms, &room_id, &sender, content)
                            .expect("a valid message"),
                        Source::Local,
                    )
                })
                .collect();
            host::commit(&app.first.rooms, batch).await?;
            done += n;
        }
        eprintln!(
            "searchbench: indexed {} messages in {:.1}s",
            args.messages,
            started.elapsed().as_secs_f64()
        );
        let mut times = Vec::with_capacity(args.queries);
        let mut bound = Vec::with_capacity(args.queries);
        let mut results = 0usize;
        for i in 0..args.queries {
            // Half one-word queries, half two words.
            let q = if i % 2 == 0 {
                word(&mut rng)
            } else {
                format!("{} {}", word(&mut rng), word(&mut rng))
            };
            let t = Instant::now();
            let hits = search::search(&app.first.rooms, &sender, &q)?;
            times.push(t.elapsed());
            results += hits.len();
            let t = Instant::now();
            let mut built = 0;
            for (room, hit) in &hits {
                let seq = hit.seq.expect("a search hit is sequenced");
                let room = RoomId::parse(room)?;
                built += views::messages(&app.first.rooms, &reader, &room, seq - 1, 1)?.len();
            }
            bound.push(t.elapsed());
            anyhow::ensure!(
                built == hits.len(),
                "the bound read {built} of {} hits",
                hits.len()
            );
        }
        times.sort();
        bound.sort();
        let mean = |d: &[Duration]| {
            d.iter().map(Duration::as_secs_f64).sum::<f64>() * 1000.0 / d.len() as f64
        };
        println!(
            "{}",
            serde_json::json!({
                "messages": args.messages,
                "queries": args.queries,
                "p50_ms": round3(percentile(&times, 0.5)),
                "p99_ms": round3(percentile(&times, 0.99)),
                "mean_ms": round3(mean(&times)),
                "results_mean": results as f64 / args.queries as f64,
                "bound_p50_ms": round3(percentile(&bound, 0.5)),
                "bound_p99_ms": round3(percentile(&bound, 0.99)),
                "bound_mean_ms": round3(mean(&bound)),
                "ratio_p99": round3(percentile(&times, 0.99) / percentile(&bound, 0.99)),
                "ratio_mean": round3(mean(&times) / mean(&bound)),
            })
        );
        app.shutdown.cancel();
        Ok(())
    })
}
