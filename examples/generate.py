# ruff: noqa: E501  (hand-written dialogue: one line per message reads best)
"""Rewrite the example conversation files in this folder.

Run ``python examples/generate.py``. The dialogue is hand-written below; the script only
adds timestamps and writes each file in its format, so the output is stable.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
START = datetime(2025, 3, 11, 9, 2, 0, tzinfo=UTC)

SUPPORT_SYSTEM = (
    "You are the on-call assistant for Larkspur Analytics' data platform team. "
    "Answer briefly, name the exact command or setting, and say when you are unsure."
)

# (user, assistant) pairs: Priya Raman (data engineer) debugging the nightly ETL.
SUPPORT_TURNS: list[tuple[str, str]] = [
    (
        "Morning. The nightly ETL failed again at 03:15 UTC. Ticket #4821. Where do I start?",
        "Start with the scheduler log for run 2025-03-11. Which step failed: extract, transform or load?",
    ),
    (
        "The load step. Error says: deadlock detected while inserting into events_daily.",
        "A deadlock on load usually means two writers touch the same rows. Is anything else writing to events_daily at 03:15?",
    ),
    (
        "Tomás moved the backfill job to 03:00 last week. It probably still runs at 03:15.",
        "That fits. The backfill and the nightly load both upsert events_daily, so they can lock rows in opposite order.",
    ),
    (
        "How long does the backfill take now?",
        "Check the last five runs in the scheduler history; the command is `airflow dags list-runs -d backfill_events`.",
    ),
    (
        "Runs took 22, 24, 31, 19 and 27 minutes.",
        "So it overlaps the 03:15 load on most nights. Moving one of them is the cheapest fix.",
    ),
    (
        "Can we just move the nightly load to 04:00?",
        "You can, but the finance dashboard reads events_daily at 04:30. A 04:00 start leaves 30 minutes for a load that took 41 minutes on Friday.",
    ),
    (
        "Right, Dana's finance dashboard. Moving the backfill earlier then?",
        "Yes: 02:15 gives the backfill 60 minutes of headroom before the load starts at 03:15.",
    ),
    (
        "Decision: backfill moves to 02:15. I'll tell Tomás. What about a guard so they never overlap again?",
        "Use a pool with one slot for both DAGs, e.g. `pool='events_daily_writers'` on the writing tasks.",
    ),
    (
        "Show me the task definition with the pool.",
        "Like this:\n```python\nload = PythonOperator(\n    task_id='load_events_daily',\n    python_callable=load_events,\n    pool='events_daily_writers',\n)\n```",
    ),
    (
        "And create the pool how?",
        'Once, from the CLI: `airflow pools set events_daily_writers 1 "serialize writers to events_daily"`.',
    ),
    (
        "Done. Pool exists with 1 slot. Second issue: the transform step got slow. 18 minutes last month, 35 now.",
        "Did the input grow? Compare the row counts of raw_events for the same weekday a month apart.",
    ),
    (
        "Raw events went from 41 million to 44 million rows. Not double.",
        "Then the data is not the cause. Did the transform query or its indexes change?",
    ),
    (
        "Someone added a column `session_region` and a join to geo_lookup two weeks ago.",
        "Does geo_lookup have an index on the join key? Run `\\d geo_lookup` in psql and look for ip_prefix.",
    ),
    (
        "No index on ip_prefix. The table has 2.3 million rows.",
        "That join scans geo_lookup for every batch. Create the index concurrently so reads are not blocked.",
    ),
    (
        "What is the exact statement?",
        "```sql\nCREATE INDEX CONCURRENTLY idx_geo_lookup_ip_prefix\n    ON geo_lookup (ip_prefix);\n```\nIt cannot run inside a transaction block.",
    ),
    (
        "Index built in 48 seconds. I'll rerun the transform on staging.",
        "Good. Note the old and new durations in ticket #4821 so the change is traceable.",
    ),
    (
        "Staging transform: 16 minutes. Back to normal.",
        "Great. That confirms the missing index was the cause of the slowdown.",
    ),
    (
        "Next question from Dana: can the dashboard show data until 03:00 instead of midnight?",
        "Only if the load runs more often. Today it is one nightly batch that covers the previous UTC day.",
    ),
    (
        "What would an hourly load cost us?",
        "Roughly 24 small loads of about 1.8 million rows each. The warehouse credits would go up about 15% by my estimate, but I am not sure of your pricing tier.",
    ),
    (
        "We are on the Team tier, 400 credits a month, using 310.",
        "Then 15% more is about 46 credits, which keeps you at 356 of 400. It fits, with little margin.",
    ),
    (
        "Let's not do hourly yet. Maybe every 6 hours. Put that on the roadmap.",
        "Noted: a 6-hourly load as a roadmap item, to revisit once the overlap fix has run for two weeks.",
    ),
    (
        "Who owns the roadmap doc?",
        "From earlier messages I only know Tomás and Dana. Check the doc's owner field; I do not have access to it.",
    ),
    (
        "It's Marek. OK. Now the flaky API: the partner feed returns 502 about twice a week.",
        "Is the extract retrying? A 502 from a gateway is often transient and worth three retries with backoff.",
    ),
    (
        "The extract has no retries at all. It fails the whole DAG.",
        "Add retries on the extract task: `retries=3, retry_delay=timedelta(minutes=2), retry_exponential_backoff=True`.",
    ),
    (
        "Will a retry re-download the whole file? It is 2.4 GB.",
        "If the extract writes to a temp file and renames it at the end, a retry starts over. Resume needs HTTP range support from the partner.",
    ),
    (
        "Does their API support Range headers?",
        "Try it: `curl -I -H 'Range: bytes=0-1023' https://feed.partner.example/v2/export`. A 206 answer means yes.",
    ),
    (
        "Got 206 Partial Content.",
        "Then you can resume: keep the partial file, and on retry request `Range: bytes=<size>-` and append.",
    ),
    (
        "Write me the resume logic?",
        "A sketch:\n```python\ndef fetch(url, path):\n    start = path.stat().st_size if path.exists() else 0\n    headers = {'Range': f'bytes={start}-'} if start else {}\n    with requests.get(url, headers=headers, stream=True, timeout=60) as r:\n        r.raise_for_status()\n        with path.open('ab') as out:\n            for chunk in r.iter_content(1 << 20):\n                out.write(chunk)\n```",
    ),
    (
        "What if the file changed on their side between attempts?",
        "Send `If-Range` with the ETag from the first response. If the file changed, the server sends the whole file with 200 instead of 206.",
    ),
    (
        "Then I need to truncate on 200.",
        "Exactly: on 200, truncate the partial file and write from the start.",
    ),
    (
        "Tomás says the backfill move is deployed. Schedule is 02:15 now.",
        "Good. Tonight's run will tell: the load at 03:15 should start with the pool slot free.",
    ),
    (
        "Let's also alert if the load has not finished by 04:15.",
        "Use an SLA on the load task, `sla=timedelta(hours=1)`, and route SLA misses to the #data-oncall channel.",
    ),
    (
        "What's the Slack webhook setting called?",
        "In your alerting plugin it is `SLACK_WEBHOOK_URL`; keep it in the secrets backend, not in the DAG file.",
    ),
    (
        "Fine. Summary for the ticket please: what changed today?",
        "Backfill moved to 02:15; pool events_daily_writers with 1 slot; index idx_geo_lookup_ip_prefix; retries with resume on the extract; SLA alert at 04:15.",
    ),
    (
        "Next morning. The load finished at 03:52. No deadlock.",
        "That is 37 minutes, inside the window, and no overlap. The pool worked.",
    ),
    (
        "But the extract retried twice at 01:10 and then succeeded. Resume worked: 2.4 GB, only 600 MB re-fetched.",
        "Good result: 75% less data on the retry. Keep an eye on whether the 502s cluster around 01:00.",
    ),
    (
        "Could the 502s be their maintenance window?",
        "Possibly. Their status page may list a nightly window. If it is 01:00 to 01:30, start the extract at 01:45.",
    ),
    (
        "Status page says maintenance 00:55 to 01:20 UTC daily.",
        "Then move the extract start to 01:30. It still finishes well before the 02:15 backfill.",
    ),
    (
        "How long is the extract normally?",
        "From the logs you shared: 2.4 GB at roughly 40 MB/s, about a minute of transfer plus parsing. Check the task duration to be sure.",
    ),
    (
        "Task duration says 6 minutes.",
        "Then 01:30 to about 01:36, with 39 minutes of slack before the backfill.",
    ),
    (
        "Decision: extract at 01:30. Marek approved.",
        "Noted. I would also keep the retries; the maintenance window may move.",
    ),
    (
        "One more thing: Dana wants a row count check after load.",
        "Add a check task after load that compares today's row count with the 7-day median and fails if it is off by more than 20%.",
    ),
    (
        "Show the query for the median check.",
        "```sql\nSELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY n)\nFROM (SELECT count(*) AS n FROM events_daily\n      WHERE day >= current_date - 7 GROUP BY day) t;\n```",
    ),
    (
        "What threshold did we pick again?",
        "20% from the 7-day median, failing the check task and alerting #data-oncall.",
    ),
    (
        "Great. Can you remind me which index we created and why?",
        "idx_geo_lookup_ip_prefix on geo_lookup(ip_prefix), created concurrently because the transform's join scanned 2.3 million rows per batch.",
    ),
    (
        "And when does each job run now?",
        "Extract 01:30, backfill 02:15, nightly load 03:15 with the writers pool, SLA alert if the load is not done by 04:15.",
    ),
    (
        "Thanks, closing ticket #4821.",
        "You're welcome. I'd revisit the 6-hourly load idea with Marek in two weeks.",
    ),
]

LONG_SYSTEM = "You are a senior reviewer. Give thorough, structured feedback on design documents."

LONG_PARAGRAPHS = [
    "The proposal replaces the single Postgres primary that backs the order service with a "
    "three-node cluster managed by Patroni, with synchronous replication to one standby and "
    "asynchronous replication to the second. The stated goals are to cut the recovery time "
    "after a primary failure from the current 25 to 40 minutes of manual work to under 60 "
    "seconds, and to stop losing the last few seconds of committed orders when the primary's "
    "disk fails, which happened twice last year.",
    "Before the details, one framing point: the document mixes two different promises. "
    "Failover time is an availability promise, and it depends on detection, leader election "
    "and client reconnection. Zero data loss is a durability promise, and it depends only on "
    "whether a commit waits for the standby. The design should state each as a number with "
    "its own test, because a synchronous standby that is down silently degrades the second "
    "promise while the first still looks healthy on the dashboard.",
    "On detection: Patroni's default loop_wait of 10 seconds and ttl of 30 seconds mean a "
    "dead primary is noticed after up to 30 seconds, and then the election and promotion add "
    "a few more. That fits inside 60 seconds, but only if the clients reconnect quickly. The "
    "order service uses a connection pool with a 30 second idle check and no retry on "
    "connection reset, so in practice the first requests after failover will fail. Please "
    "add a section on client behaviour: pgbouncer or HAProxy in front, health checks on the "
    "Patroni REST API, and retries for idempotent requests only.",
    "On durability: synchronous_commit set to on with synchronous_standby_names naming one "
    "standby gives zero loss while that standby is up. When it is down, Patroni's "
    "synchronous_mode_strict decides whether writes stop or continue without the guarantee. "
    "The document does not say which one you want. For orders, I would argue writes should "
    "continue and an alert should fire, because a stopped checkout costs more than a small "
    "window of risk, but that is a business decision and should be written down with an owner.",
    "Capacity: the current primary peaks at 2,300 transactions per second with a p99 commit "
    "latency of 4 milliseconds. Synchronous replication to a standby in the same region adds "
    "one network round trip, about 0.6 milliseconds between your availability zones, plus the "
    "standby's fsync. The load test in the appendix only ran at 800 transactions per second; "
    "please rerun it at 3,000 so we know the p99 with headroom, and include the standby's "
    "disk latency, which is usually the real cost.",
    "Operations: the runbook covers planned switchover well, but not the split-brain case "
    "where the etcd cluster loses quorum. With three etcd members co-located on the database "
    "nodes, losing two nodes loses both the database majority and the consensus store. "
    "Consider running etcd on three separate small instances, or at least document that a "
    "two-node loss means read-only mode and manual intervention.",
    "Migration plan: moving from the single primary to the cluster is described as a weekend "
    "cutover with 2 hours of downtime. You can avoid most of that by building the cluster as "
    "a replica of the current primary, letting it catch up, and then switching over with a "
    "short write freeze of a minute or two. The document already has the pieces; it is "
    "mostly an ordering change, and it makes rollback easy because the old primary stays "
    "intact until you decide it is safe to retire.",
    "Testing: I would like to see a failure drill in staging before production, with a "
    "written expectation for each case: kill the primary process, power off the primary "
    "node, partition the primary from etcd, fill the standby's disk, and restart etcd "
    "members one at a time. For each, record time to detect, time to promote, client errors "
    "seen and transactions lost, and compare with the promises in the first section.",
]

LONG_QUESTIONS = [
    "Here is the design doc summary for the order database high-availability project. {p} "
    "Please review the overall direction and tell me what is missing before we take it to "
    "the architecture board on Thursday. I care most about data loss, failover time and how "
    "the application will behave during a failover, because the checkout team will ask.",
    "Thanks. The next part of the doc is about replication settings. {p} Is that reasoning "
    "sound, and what would you change? We have been going back and forth on strict mode for "
    "a week and I would like a recommendation I can defend in front of the payments people.",
    "Another section, on capacity and performance. {p} Our SRE lead, Ines, thinks the "
    "latency cost is negligible. Do you agree, and what numbers should we put in the doc to "
    "convince the board that checkout will not get slower after the change?",
    "Here is the operations section as it stands. {p} What would you add to the runbook, "
    "and is it reasonable to keep etcd on the database nodes for the first phase, given "
    "that we only have budget for three new instances this quarter?",
    "Last big section: migration and rollback. {p} How would you order the steps, and what "
    "is the smallest write freeze we can honestly promise the business for the cutover?",
    "Finally, testing. {p} Which failure drills are essential before production and which "
    "can wait until after launch? We have two weeks of staging time booked in April.",
]


def stamp(index: int, spacing: int = 70) -> str:
    """ISO time of the ``index``-th message."""
    moment = START + timedelta(seconds=index * spacing + (index % 3) * 11)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def support_chat() -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": SUPPORT_SYSTEM, "timestamp": stamp(0)}]
    for user, assistant in SUPPORT_TURNS:
        messages.append({"role": "user", "content": user, "timestamp": stamp(len(messages))})
        messages.append({"role": "assistant", "content": assistant, "timestamp": stamp(len(messages))})
    return {"session_id": "support-4821", "messages": messages}


def long_messages() -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": LONG_SYSTEM, "timestamp": stamp(0, 240)}]
    for n, question in enumerate(LONG_QUESTIONS):
        paragraph = " ".join(LONG_PARAGRAPHS[n : n + 3])
        messages.append(
            {"role": "user", "content": question.format(p=paragraph), "timestamp": stamp(len(messages), 240)}
        )
        answer = (
            f"Review of that section. {LONG_PARAGRAPHS[(n + 1) % len(LONG_PARAGRAPHS)]} "
            f"{LONG_PARAGRAPHS[(n + 4) % len(LONG_PARAGRAPHS)]} "
            "In short: keep the direction, write the promise as a number with a test, and "
            "name an owner for each decision the document currently leaves open."
        )
        messages.append({"role": "assistant", "content": answer, "timestamp": stamp(len(messages), 240)})
    return {"session_id": "ha-design-review", "messages": messages}


SHAREGPT = [
    {
        "id": "sharegpt-rust-lifetimes",
        "conversations": [
            {
                "from": "human",
                "value": 'Why does the Rust compiler say `borrowed value does not live long enough` here?\n```rust\nlet r;\n{\n    let x = 5;\n    r = &x;\n}\nprintln!("{}", r);\n```',
            },
            {
                "from": "gpt",
                "value": "`x` is dropped at the end of the inner block, but `r` is used after it. A reference cannot outlive the value it points to. Move `let x = 5;` to the outer scope, or print inside the block.",
            },
            {"from": "human", "value": "What if I need the value after the block?"},
            {
                "from": "gpt",
                "value": "Then own it instead of borrowing: `let r = { let x = 5; x };` moves or copies the value out, so nothing dangles.",
            },
            {"from": "human", "value": "And for a String instead of an integer?"},
            {
                "from": "gpt",
                "value": 'Same idea: return the String from the block and it moves out. `let s = { let t = String::from("hi"); t };` works because ownership transfers to `s`.',
            },
        ],
    },
    {
        "id": "sharegpt-trip-lisbon",
        "conversations": [
            {"from": "system", "value": "You are a helpful travel planner."},
            {
                "from": "human",
                "value": "I have three days in Lisbon in May with a budget of 600 euros. What should I prioritise?",
            },
            {
                "from": "gpt",
                "value": "Day 1 Alfama and the castle, day 2 Belém (tower, monastery, pastéis), day 3 a day trip to Sintra. Budget about 90 euros a night for a guesthouse and 60 a day for food and transport.",
            },
            {"from": "human", "value": "Is the Lisboa Card worth it?"},
            {
                "from": "gpt",
                "value": "For a Belém day, usually yes: the 72-hour card is about 45 euros and covers transport plus the monastery and tower. It does not cover most Sintra palaces.",
            },
            {"from": "human", "value": "How do I get to Sintra?"},
            {
                "from": "gpt",
                "value": "Train from Rossio station, about 40 minutes, every 20 minutes or so. Go early: by 11:00 the Pena Palace queue is long.",
            },
            {"from": "human", "value": "Thanks, booking the guesthouse in Graça."},
            {
                "from": "gpt",
                "value": "Good choice: Graça is quiet, close to Alfama, and tram 28 stops nearby.",
            },
        ],
    },
    {
        "id": "sharegpt-sql-window",
        "conversations": [
            {"from": "human", "value": "How do I get each customer's latest order in PostgreSQL?"},
            {
                "from": "gpt",
                "value": "Use DISTINCT ON:\n```sql\nSELECT DISTINCT ON (customer_id) *\nFROM orders\nORDER BY customer_id, created_at DESC;\n```",
            },
            {"from": "human", "value": "Is there a portable way that works in MySQL 8 too?"},
            {
                "from": "gpt",
                "value": "A window function: `ROW_NUMBER() OVER (PARTITION BY customer_id ORDER BY created_at DESC)` in a subquery, then keep rows where it equals 1.",
            },
        ],
    },
]

JSONL_CONVERSATIONS = [
    {
        "session_id": "jsonl-onboarding",
        "messages": [
            {"role": "system", "content": "You help new hires set up their laptops."},
            {
                "role": "user",
                "content": "I'm Kofi, starting Monday on the mobile team. What do I install first?",
            },
            {
                "role": "assistant",
                "content": "Welcome, Kofi. Install Xcode 16 and Android Studio first; both are large downloads.",
            },
            {"role": "user", "content": "Which Node version does the mobile repo need?"},
            {
                "role": "assistant",
                "content": "Node 20 LTS, pinned in `.nvmrc`. Run `nvm install` in the repo root.",
            },
            {"role": "user", "content": "Where do I get access to the staging API?"},
            {
                "role": "assistant",
                "content": "Request the `mobile-staging` group in the access portal; Hana approves it, usually within a day.",
            },
        ],
    },
    {
        "session_id": "jsonl-invoice",
        "messages": [
            {"role": "user", "content": "Invoice INV-2291 shows 1,240 euros but the quote was 1,180. Why?"},
            {
                "role": "assistant",
                "content": "The 60 euro difference is the express shipping added on 4 February. It is listed on line 3 of the invoice.",
            },
            {"role": "user", "content": "We never asked for express shipping."},
            {
                "role": "assistant",
                "content": "Then reply to billing with the quote number Q-0815 and ask for a corrected invoice without line 3.",
            },
        ],
    },
]


def write_json(name: str, data: Any) -> None:
    (HERE / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> None:
    write_json("support-chat.json", support_chat())
    write_json("long-messages.json", long_messages())
    write_json("sharegpt.json", SHAREGPT)
    lines = [json.dumps(conv, ensure_ascii=False) for conv in JSONL_CONVERSATIONS]
    (HERE / "openai.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
