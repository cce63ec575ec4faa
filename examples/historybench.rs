//! History paging benchmark (issue 14): one room of `--events` events
//! (every `--reaction-every`-th a reaction to an earlier message),
//! written through the real host sequencer, then read from the start page
//! by page as a client does (`GET …/messages?after_seq=&limit=`), timed.
//! The bound is the same pages read as raw rows (the room's event range,
//! decoded, no views and no reactions), in the same run.
//!
//! ```text
//! cargo run --release --example historybench -- --events 1000000 --limit 1000
//! ```
//!
//! Prints one JSON line:
//! `{"events","messages","pages","messages_per_s","bound_rows_per_s","ratio",…}`.

use std::time::Instant;

use clap::Parser;
use rand::{Rng, SeedableRng};
use scaiwave::config::StorageSync;
use scaiwave::ids::EventId;
use scaiwave::protocol::event::{Content, ReactionAction};
use scaiwave::rooms::host::{self, Source};
use scaiwave::rooms::{commands, views};
use scaiwave::storage::{keys, StoredEvent, T};

#[allow(dead_code)]
mod common;
use common::{one_room, OneRoom};

// The same allocator as the shipped binary, so the figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Events in the room (messages and reactions).
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// One event in this many is a reaction to an earlier message.
    #[arg(long, default_value_t = 10)]
    reaction_every: usize,
    /// Messages per page.
    #[arg(long, default_value_t = 1000)]
    limit: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.limit > 0 && args.reaction_every > 1,
        "--limit ≥ 1, --reaction-every ≥ 2"
    );
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        // Writing the room is setup, not what is measured: no fdatasync.
        let OneRoom {
            app,
            reader: me,
            fqid: sender,
            room_id,
            ..
        } = one_room("history", StorageSync::Flush).await?;
        let rooms = &app.first.rooms;

        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut messages: Vec<EventId> = Vec::new();
        let started = Instant::now();
        let mut written = 0;
        while written < args.events {
            let n = (args.events - written).min(100);
            let mut batch = Vec::with_capacity(n);
            for i in written..written + n {
                let content = if i % args.reaction_every == 0 && !messages.is_empty() {
                    Content::Reaction {
                        target: messages[rng.random_range(0..messages.len())],
                        key: ["👍", "🎉", "❤️"][i % 3].into(),
                        action: ReactionAction::Add,
                    }
                } else {
                    Content::Message {
                        body: format!("history message {i}"),
                        thread_root: None,
                        reply_to: None,
                        mentions: vec![],
                    }
                };
                let event = commands::sign(rooms, &room_id, &sender, content)?;
                if matches!(event.content, Content::Message { .. }) {
                    messages.push(event.event_id);
                }
                batch.push((event, Source::Local));
            }
            host::commit(rooms, batch).await?;
            written += n;
        }
        eprintln!(
            "historybench: wrote {} events ({} messages) in {:.1}s",
            args.events,
            messages.len(),
            started.elapsed().as_secs_f64()
        );

        // The client's walk: pages of `limit` messages, each after the
        // last seq of the one before.
        let t = Instant::now();
        let (mut after, mut read, mut pages, mut reacted) = (0u64, 0usize, 0usize, 0usize);
        loop {
            let page = views::messages(rooms, &me, &room_id, after, args.limit)?;
            let Some(last) = page.last().and_then(|m| m.seq) else {
                break;
            };
            read += page.len();
            reacted += page.iter().filter(|m| !m.reactions.is_empty()).count();
            pages += 1;
            after = last;
        }
        let paged = t.elapsed().as_secs_f64();

        // The bound: the same room range in pages of raw rows.
        let store = &app.first.store;
        let end = keys::event(room_id.as_str(), u64::MAX);
        let t = Instant::now();
        let (mut after, mut rows) = (0u64, 0usize);
        loop {
            let from = keys::event(room_id.as_str(), after + 1);
            let page = store.range::<StoredEvent>(T::Events, &from, &end, args.limit)?;
            let Some((k, _)) = page.last() else { break };
            rows += page.len();
            after = u64::from_be_bytes(k[k.len() - 8..].try_into()?);
        }
        let bound = t.elapsed().as_secs_f64();

        let per_s = read as f64 / paged;
        let bound_per_s = rows as f64 / bound;
        println!(
            "{}",
            serde_json::json!({
                "events": args.events,
                "messages": read,
                "messages_with_reactions": reacted,
                "pages": pages,
                "limit": args.limit,
                "seconds": (paged * 1000.0).round() / 1000.0,
                "messages_per_s": per_s.round(),
                "bound_rows": rows,
                "bound_rows_per_s": bound_per_s.round(),
                "ratio": ((per_s / bound_per_s) * 1000.0).round() / 1000.0,
            })
        );
        app.shutdown.cancel();
        Ok(())
    })
}
