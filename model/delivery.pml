/*
 * Fieldlink's delivery protocol (DESIGN.md §4, §5) as a Promela model for SPIN.
 * model/README.md explains the states, what each part abstracts, the properties, the bounds,
 * how to run it and what the counterexamples look like. Every step names the code it models.
 *
 * Records are named by their seq; a set of seqs is a bit mask (bit s = seq s), so a batch,
 * an ack and a narrowband frame are each one byte. Seqs run 1..MAXSEQ (at most 7; with
 * POWERCUT the skipped seqs and their reports need room, so MAXSEQ is 7, and a data message is
 * a short that carries each seq's incarnation in its high byte).
 */

/* ---- bounds (override with -D) -------------------------------------------------------- */
#ifndef NREC
#define NREC 3          /* records the producer appends: alarm raise, telemetry, alarm clear, ... */
#endif
#ifndef CRASHES
#define CRASHES 2       /* process crashes in a run: edge agent, central, broker restart */
#endif
#ifndef FAULTS
#define FAULTS 2        /* message faults: loss, duplicate, link drop, early ack timeout, radio loss */
#endif
#ifndef DROPS
#define DROPS 1         /* budget evictions (each appends one report record) */
#endif
#ifndef QN
#define QN 2            /* messages the broker holds per direction (2 or 3)                  */
#endif
#ifndef RBLOCK
#define RBLOCK 2        /* POWERCUT: seqs the outbox reserves on disk at a time (outbox_seqs.py) */
#endif
#define BIT(s) (1 << (s))
#ifdef POWERCUT
#define MAXSEQ 7
/* records: alarm raise, then telemetry only; a message carries each seq's incarnation */
#define IS_ALARM(n) ((n) == 0)
#define MSG(b) ((b) | ((gen & (b)) << 8))
#define SEQS(m) ((m) & 255)
#define MSGT short
#else
#define MAXSEQ (NREC + DROPS)
#define MSGT byte
/* records alternate: alarm raise, telemetry, alarm clear, telemetry, alarm raise, ... */
#define IS_ALARM(n) ((n) % 2 == 0)
#define MSG(b) (b)
#define SEQS(m) (m)
#endif
#define ASSIGNED ((1 << next_seq) - 2)      /* seqs handed out so far: 1 .. next_seq-1 */

/* ---- variants and mutants (each must make a property fail; see README) ----------------- */
/* NO_INFLIGHT_CHECK  an ack marks every seq it names (the uplink before the h9 rule)        */
/* FORGE=1            one forged ack naming any seq is published on down/ack                  */
/* FORGE=2            one forged ack naming a seq not in flight is handled by the edge        */
/* ACK_BEFORE_COMMIT  central publishes down/ack before its transaction commits              */
/* MARK_ON_PUBACK     the edge marks a batch delivered when the broker takes it              */
/* DEDUP_OFF          central inserts without ON CONFLICT (gw, stream, seq) DO NOTHING       */
/* FORGET_NO_RESEND   in-flight state is forgotten but its records are never sent again      */
/* NO_SEQ_ORDER       central applies alarm transitions in arrival order (no is_newer)       */
/* ARRIVAL            keep the arrival order of history rows, for the property arrival_order  */
/* POWERCUT           the gateway loses power: outbox.db keeps only what was fsynced        */
/* SEQ_REUSE          ... and the outbox has no seq reservation (the code before the fix)    */
/* SKIP_UNREPORTED    ... the outbox skips the reserved seqs but does not report them        */
/* RESERVE_UNSYNCED   ... the outbox raises the reservation in a commit that is not synced   */
#ifndef FORGE
#define FORGE 0
#endif

/* ---- the edge outbox: outbox.db, on disk (edge_agent/outbox/store.py) ------------------------ */
byte next_seq = 1;      /* sqlite_sequence + 1: AUTOINCREMENT never hands a seq out twice   */
byte appended = 0;      /* producer records appended so far                                 */
byte undeliv = 0;       /* rows with delivered = 0                                          */
byte alarms = 0;        /* seqs that are ALARM records (lane alarm)                         */
byte raises = 0;        /* ... of which state 'raised'                                      */
byte telem = 0;         /* seqs that are TELEMETRY records (may be evicted)                 */
byte rep_of[MAXSEQ + 1];/* report record seq -> the seqs its outbox_dropped event names     */
byte nb_wm = 0;         /* meta narrowband_sent_seq (edge_agent/narrowband/fallback.py WATERMARK_KEY) */
byte drops_left = DROPS;

/* ---- edge agent memory (lost when the agent crashes) ---------------------------------- */
bool up = true;         /* Uplink.connected (a run starts connected; see README)            */
byte infl[2];           /* Uplink._inflight: two batch slots (max_inflight), seq masks      */
byte forgot = 0;        /* FORGET_NO_RESEND only: seqs the broken uplink never resends      */

/* ---- broker: Mosquitto, QoS 1, no persistence ----------------------------------------- */
MSGT upq[3];            /* up/data messages queued for central (persistent session): a bag  */
byte dnq[3];            /* down/ack messages queued for the edge (clean_session=False): bag */

/* ---- the narrowband path (BeiDou / PDT) ----------------------------------------------- */
byte nbq = 0;           /* one frame in the air: the seqs of its alarm entries              */

/* ---- central database (durable: synchronous=FULL / synchronous_commit=on) -------------- */
byte held = 0;          /* (gw, stream, seq) rows in readings/events                        */
byte nbcopy = 0;        /* held rows flagged NARROWBAND_COPY (not yet merged with IP copy)  */
byte known_lost = 0;    /* seqs named by an outbox_dropped report central holds             */
byte alast = 0;         /* alarm_keys.last_seq of the alarm key (0: none applied)           */
bool aactive = false;   /* alarms: the key has an active alarm                              */
#ifdef ARRIVAL
byte hist_max = 0;      /* highest seq in alarm_events (history rows) so far (ARRIVAL only) */
#endif

/* ---- budgets and ghost variables (observers only; no code holds them) ------------------ */
byte crashes = CRASHES;
byte faults = FAULTS;
bool prod_exit = false;         /* the producer has appended everything it will            */
byte elast = 0;                 /* seq of the edge's last alarm transition                 */
bool eraise = false;            /* ... and whether it was a raise                          */
bool early_mark = false;        /* a record marked delivered while central held no full copy */
bool dup_row = false;           /* central inserted a second row for one (gw, stream, seq) */
bool applied_disorder = false;  /* central applied a transition older than one applied before */
bool hist_disorder = false;     /* a history row arrived with a seq below an earlier one   */
byte dropped = 0;               /* seqs the budget evicted                                 */
byte reported = 0;              /* seqs named by a report record in the outbox             */

byte gen = 0;           /* ghost: seqs handed out a second time (only POWERCUT sets it)     */
#ifdef POWERCUT
/* What the last fsync of outbox.db holds: a commit with synchronous=FULL (an alarm, event or
 * budget pass, or one that raises the seq reservation) syncs the WAL; telemetry appends and
 * delivery marks (synchronous=NORMAL) survive a killed process but not a power cut
 * (edge_agent/outbox/store.py, "Durability"). */
byte s_next = 1;        /* sqlite_sequence as synced: AUTOINCREMENT rolls back with it       */
byte s_undeliv = 0;
byte s_telem = 0;
byte s_nbwm = 0;
byte reserved = 0;      /* seq_reserve.reserved (outbox_seqs.py)                            */
byte s_reserved = 0;    /* ... as synced: the code raises it only in synced commits          */
byte issued = 1;        /* ghost: the highest seq ever handed out, plus one                  */
byte cgen = 0;          /* ghost: held seqs whose row at central is that second incarnation */
inline SYNC() {
    s_next = next_seq; s_undeliv = undeliv; s_telem = telem; s_nbwm = nb_wm;
    s_reserved = reserved
}

/* A seq is handed out (next_seq, before next_seq++): the ghost notes a second incarnation.
 * outbox_seqs.py SeqReservation.cover: past the reservation, raise it by a block in the same
 * transaction, which then commits with synchronous=FULL (sync = true). */
inline HAND_OUT(sync) {
    assert(next_seq <= MAXSEQ);
    if :: next_seq < issued -> gen = gen | BIT(next_seq) :: else -> issued = next_seq + 1 fi;
#ifndef SEQ_REUSE
#ifdef RESERVE_UNSYNCED
    if :: next_seq > reserved -> reserved = next_seq + RBLOCK - 1 :: else -> skip fi
#else
    if :: next_seq > reserved -> reserved = next_seq + RBLOCK - 1; sync = true :: else -> skip fi
#endif
#endif
}
#endif

#define FULL_HELD (held & ~nbcopy)
#define INFL (infl[0] | infl[1])

/* Bags are kept sorted, largest first, so that two states that differ only in which slot
 * holds which message are one state; a message is put into slot 2 (free iff the bag has
 * room) and taken by zeroing its slot, and the bag is sorted again. */
#define CSWAP(a, i, j) if :: a[i] < a[j] -> a[i] = a[i] ^ a[j]; a[j] = a[i] ^ a[j]; a[i] = a[i] ^ a[j] :: else -> skip fi
#define SORT2(a) CSWAP(a, 0, 1)
#if QN == 3
#define SORTQ(a) CSWAP(a, 0, 1); CSWAP(a, 1, 2); CSWAP(a, 0, 1)
#else
#define SORTQ(a) CSWAP(a, 0, 1)
#endif
#define LASTQ (QN - 1)
#define PUTQ(a, v) a[LASTQ] = v; SORTQ(a)

/* ---- properties (check one at a time: ./pan -a [-f] -N name) ---------------------------- */
/* no record is marked delivered at the edge before central committed it (in full)          */
ltl no_early_mark   { [] !early_mark }
/* central never holds two rows for one (gw, stream, seq)                                   */
ltl exactly_once    { [] !dup_row }
/* every eviction is named by a report record committed with it                             */
ltl drop_reported   { [] ((dropped & ~reported) == 0) }
/* every record appended and not evicted is eventually committed, in full, at central      */
ltl all_committed   { <> (prod_exit && (ASSIGNED & ~dropped & ~FULL_HELD) == 0) }
/* ... and the edge eventually marks every record delivered (the outbox drains)             */
ltl outbox_drains   { <> (prod_exit && undeliv == 0) }
/* central eventually knows of every eviction (the report reached central)                  */
ltl drops_known     { <> (prod_exit && (dropped & ~known_lost) == 0) }
/* central applies an alarm's transitions in seq order, whatever order they arrive in        */
ltl alarm_seq_order { [] !applied_disorder }
/* ... and the alarm ends in the state of the edge's last transition                        */
ltl alarm_final     { <> (prod_exit && alast == elast && aactive == eraise) }
/* the raw arrival order (history rows) is NOT seq order: this one is expected to FAIL      */
ltl arrival_order   { [] !hist_disorder }
/* no seq is ever handed out twice, also across a power cut (only POWERCUT can break it)     */
ltl seq_unique      { [] (gen == 0) }

/* ---- central: one record of a committed transaction ------------------------------------- */

/* central/alarms/engine.py apply_event: the history row goes in once per (gw, stream, seq)
 * (a duplicate returns before it); decide() applies the event only if is_newer
 * (central/alarms/lifecycle.py: within one stream, seq > alarm_keys.last_seq), else note='stale'. */
inline c_alarm(s) {
#ifdef ARRIVAL
    if
    :: s < hist_max -> hist_disorder = true
    :: else -> hist_max = s
    fi;
#endif
#ifdef NO_SEQ_ORDER
    if :: s < alast -> applied_disorder = true :: else -> skip fi;
    alast = s;
    aactive = ((raises & BIT(s)) != 0)
#else
    if
    :: s > alast -> alast = s; aactive = ((raises & BIT(s)) != 0)
    :: else -> skip    /* stale: kept in history with applied = 0, changes nothing */
    fi
#endif
}

/* central/storage/sqlite.py _write_batch + writes.py: ON CONFLICT (gw, stream, seq) DO NOTHING;
 * an IP copy of a held NARROWBAND_COPY row replaces it (merge_program) without running the
 * transition again; a report event is tallied (delivery.py loss_report, StreamTally.lost). */
inline c_record(s, from_nb) {
    if
    :: (held & BIT(s)) != 0 ->
#ifdef DEDUP_OFF
        dup_row = true;
#endif
        if
        :: !from_nb && (nbcopy & BIT(s)) != 0 -> nbcopy = nbcopy & ~BIT(s)
        :: else -> skip
        fi
    :: else ->
        held = held | BIT(s);
#ifdef POWERCUT
        if :: !from_nb && (mg & BIT(s)) != 0 -> cgen = cgen | BIT(s) :: else -> skip fi;
#endif
        if :: from_nb -> nbcopy = nbcopy | BIT(s) :: else -> skip fi;
        known_lost = known_lost | rep_of[s];
        if :: (alarms & BIT(s)) != 0 -> c_alarm(s) :: else -> skip fi
    fi
}

/* one write_batches transaction: the batch's records in seq order (apply_events sorts) */
inline c_commit(m, from_nb) {
    k = 1;
    do
    :: k > MAXSEQ -> break
    :: k <= MAXSEQ ->
        if :: (m & BIT(k)) != 0 -> c_record(k, from_nb) :: else -> skip fi;
        k++
    od
}

/* ---- edge: an ack ---------------------------------------------------------------------- */

/* edge_agent/uplink/link.py Uplink._handle_ack: Outbox.mark_delivered (outbox.py _mark_sync:
 * DELETE ... WHERE seq BETWEEN ? AND ? AND delivered = 0), then _forget_acked.
 * The h9 rule: only seqs this uplink sent and still has in flight are marked. */
inline e_ack(a) {
#ifdef NO_INFLIGHT_CHECK
    mk = a & undeliv;
#else
    mk = a & INFL & undeliv;
#endif
    if :: (mk & ~FULL_HELD) != 0 -> early_mark = true :: else -> skip fi;
#ifdef POWERCUT
    /* central holds another record under this seq (an earlier incarnation) */
    if :: (mk & (gen ^ cgen)) != 0 -> early_mark = true :: else -> skip fi;
#endif
    undeliv = undeliv & ~mk;
    infl[0] = infl[0] & ~a;
    infl[1] = infl[1] & ~a;
    SORT2(infl)
}

/* Uplink._drop_inflight (on connect in _announce, in _went_down) and the ack timeout
 * (_expire_unacked): forgetting a batch is how it is resent. */
inline e_forget(i) {
#ifdef FORGET_NO_RESEND
    forgot = forgot | infl[i];
#endif
    infl[i] = 0
}

/* some copy of a batch, or of its ack, still exists somewhere: its timeout is not yet due */
#define PENDING(m) (((upq[0] | upq[1] | upq[2] | dnq[0] | dnq[1] | dnq[2]) & (m)) != 0)

/* ---- the producer and the disk budget (edge_agent/outbox/store.py, outbox_budget.py) ---------- */
proctype Producer() {
    byte t;
    bool sync;
end_p:
    do
    :: atomic {
        /* Outbox.append: one transaction, seq from AUTOINCREMENT (_insert_body); alarms commit
         * with synchronous=FULL. Records alternate alarm / telemetry; alarms raise, clear, ... */
        appended < NREC ->
        undeliv = undeliv | BIT(next_seq);
        if
        :: IS_ALARM(appended) ->
            alarms = alarms | BIT(next_seq);
            elast = next_seq;
            eraise = ((appended / 2) % 2 == 0);
            if :: eraise -> raises = raises | BIT(next_seq) :: else -> skip fi
        :: else -> telem = telem | BIT(next_seq)
        fi;
#ifdef POWERCUT
        sync = IS_ALARM(appended);   /* an alarm commits with synchronous=FULL */
        HAND_OUT(sync);
#endif
        next_seq++;
#ifdef POWERCUT
        if :: sync -> SYNC() :: else -> skip fi;
        sync = false;
#endif
        appended++
       }
    :: atomic {
        /* DiskBudget.reclaim via Outbox._budget_sync: evict an undelivered telemetry row and
         * append its outbox_dropped EVENT report in the same transaction (synchronous=FULL).
         * The code also spares the newest value per point and the live window: the model lets
         * the budget take any undelivered telemetry row, in flight or not (a superset). */
        drops_left > 0 && (undeliv & telem) != 0 ->
        t = 1;
        do
        :: t > MAXSEQ -> break
        :: t <= MAXSEQ && (undeliv & telem & BIT(t)) != 0 -> break
        :: t <= MAXSEQ && (undeliv & telem & BIT(t)) != 0 && (undeliv & telem & ~(BIT(t + 1) - 1)) != 0 -> t++
        :: t <= MAXSEQ && (undeliv & telem & BIT(t)) == 0 -> t++
        od;
        undeliv = (undeliv & ~BIT(t)) | BIT(next_seq);
        dropped = dropped | BIT(t);
        reported = reported | BIT(t);
        rep_of[next_seq] = BIT(t);
#ifdef POWERCUT
        HAND_OUT(sync);              /* synced anyway: _budget_sync commits with FULL */
        sync = false;
#endif
        next_seq++;
        drops_left--;
#ifdef POWERCUT
        SYNC();
#endif
        t = 0
       }
    :: atomic { appended == NREC -> prod_exit = true; break }
    od
}

/* ---- the uplink (edge_agent/uplink/link.py) ---------------------------------------------------- */
proctype Uplink() {
    byte b, e, s, mk, i;
end_u:
    do
    :: atomic {
        /* Uplink.run -> _client / _announce: connect (always possible again: links come
         * back), resubscribe, and drop every in-flight batch so that all of it goes again */
        !up -> up = true; e_forget(0); e_forget(1)
       }
    :: atomic {
        /* _send_loop -> Outbox.next_batch(skip=in flight) -> _publish: the batch is in flight
         * before publish returns. Lanes and batch sizes are abstracted: the batch is every
         * undelivered record not in flight, or the oldest of them alone (the code takes a
         * prefix in lane order; reordering comes from the broker, resends and the radio). */
        (up && infl[1] == 0 && upq[LASTQ] == 0 &&
         (undeliv & ~INFL & ~forgot) != 0) ->
        e = undeliv & ~INFL & ~forgot;
        if
        :: b = e                                     /* all of them (a large batch_size) ... */
        :: (e & (e - 1)) != 0 ->                     /* ... or the oldest alone (batch_size 1) */
           s = 1;
           do :: (e & BIT(s)) != 0 -> b = BIT(s); break :: else -> s++ od
        fi;
        infl[1] = b; SORT2(infl);
        PUTQ(upq, MSG(b));
#ifdef MARK_ON_PUBACK
        /* mutant: the broker's PUBACK taken for central's ack */
        if :: (b & ~FULL_HELD) != 0 -> early_mark = true :: else -> skip fi;
        undeliv = undeliv & ~b;
#endif
        b = 0; e = 0; s = 0
       }
    :: atomic {
        /* _receive_loop: a down/ack from the session queue, any of them (no order is kept
         * across reconnects); a duplicate delivery leaves a copy behind (a fault) */
        up && dnq[0] != 0 ->
        if
        :: i = 0
        :: dnq[1] != 0 -> i = 1
        :: dnq[2] != 0 -> i = 2
        fi;
        b = dnq[i];
        if :: dnq[i] = 0; SORTQ(dnq) :: faults > 0 -> faults-- fi;
        e_ack(b);
        b = 0; i = 0; mk = 0
       }
    :: atomic {
        /* _expire_unacked: the ack timeout of a batch whose messages and ack are all gone */
        infl[0] != 0 && !PENDING(infl[0]) -> e_forget(0); SORT2(infl)
       }
    :: atomic { infl[1] != 0 && !PENDING(infl[1]) -> e_forget(1) }
    od
}

/* ---- central ingest (central/ingest/subscriber.py) ---------------------------------------------------- */
proctype Central() {
    byte i, k, mg;
    MSGT b;
end_c:
    do
    :: atomic {
        /* Ingest._consume / _next_message: a queued data batch, any of them (a bag: MQTT keeps
         * no order across reconnects); QoS 1 may deliver it twice (a fault). The client
         * PUBACKs on receipt, so the broker forgets it whatever central does next. */
        upq[0] != 0 && dnq[LASTQ] == 0 ->
        if
        :: i = 0
        :: upq[1] != 0 -> i = 1
        :: upq[2] != 0 -> i = 2
        fi;
        b = upq[i];
#ifdef POWERCUT
        mg = b >> 8; b = SEQS(b);    /* the incarnation of each seq the batch carried */
#endif
        if :: upq[i] = 0; SORTQ(upq) :: faults > 0 -> faults-- fi;
        if
        :: /* _write_and_ack -> storage.write_batches (one transaction, committed), then
            * _ack: down/ack naming every seq of the batch, duplicates too */
           c_commit(b, false); PUTQ(dnq, b)
        :: crashes > 0 -> crashes--;    /* central dies after the commit, before the ack */
           c_commit(b, false)
        :: crashes > 0 -> crashes--     /* central dies before the commit: the batch is gone */
#ifdef ACK_BEFORE_COMMIT
        :: crashes > 0 -> crashes--;    /* mutant: the ack went out before the commit */
           PUTQ(dnq, b)
#endif
        fi;
        i = 0; k = 0; b = 0; mg = 0
       }
    :: atomic {
        /* central/narrowband/receiver.py NarrowbandReceiver.receive -> _store_alarms: the frame's
         * entries as ALARM records flagged NARROWBAND_COPY, via write_batches; never acked */
        nbq != 0 -> c_commit(nbq, true); nbq = 0; k = 0
       }
    od
}

/* ---- the narrowband fallback (edge_agent/narrowband/fallback.py) ------------------------------------ */
proctype Narrowband() {
    byte m, s, top;
end_n:
    do
    :: atomic {
        /* NarrowbandFallback._step while IP is down: the undelivered alarms above the
         * watermark, oldest first (Outbox.undelivered_alarms), all in one frame (a frame holds
         * about eight); the terminal accepts it (a refusal only delays: not modelled);
         * _send_alarms -> _advance moves the watermark (outbox meta narrowband_sent_seq). */
        !up && nbq == 0 && (alarms & undeliv & ~(BIT(nb_wm + 1) - 1)) != 0 ->
        m = alarms & undeliv & ~(BIT(nb_wm + 1) - 1);
        s = MAXSEQ;
        do :: (m & BIT(s)) != 0 -> top = s; break :: else -> s-- od;
        if
        :: nbq = m
        :: faults > 0 -> faults--                      /* accepted, lost in the air */
        fi;
        nb_wm = top;
        m = 0; s = 0; top = 0
       }
    od
}

/* ---- crashes and faults --------------------------------------------------------------------- */
proctype Faults() {
#ifdef POWERCUT
    byte t;
    bool sync;
#endif
end_f:
    do
    :: atomic {
        /* the edge agent dies (kill -9, watchdog): memory goes, outbox.db stays
         * (central's crashes are choices of its receive step: only what it was doing counts) */
        crashes > 0 -> crashes--;
        up = false; infl[0] = 0; infl[1] = 0
       }
    :: atomic {
        /* Mosquitto restarts without persistence: every queued message and session goes;
         * both clients see a disconnect (Uplink._went_down drops the in-flight batches;
         * ingest drops its group, its store task and its ack tasks) */
        crashes > 0 -> crashes--;
        upq[0] = 0; upq[1] = 0; upq[2] = 0; dnq[0] = 0; dnq[1] = 0; dnq[2] = 0;
        up = false; infl[0] = 0; infl[1] = 0
       }
    :: atomic {
        /* the gateway's IP link drops (keepalive): _went_down */
        faults > 0 && up -> faults--; up = false; e_forget(0); e_forget(1)
       }
    :: atomic {
        /* the broker drops one queued message (max_queued_messages) */
        faults > 0 && (upq[0] | dnq[0]) != 0 -> faults--;
        if
        :: upq[0] != 0 -> upq[0] = 0
        :: upq[1] != 0 -> upq[1] = 0
        :: upq[2] != 0 -> upq[2] = 0
        :: dnq[0] != 0 -> dnq[0] = 0
        :: dnq[1] != 0 -> dnq[1] = 0
        :: dnq[2] != 0 -> dnq[2] = 0
        fi;
        SORTQ(upq); SORTQ(dnq)
       }
    :: atomic {
        /* an ack timeout that fires while the ack is still on its way (a slow central) */
        faults > 0 && (infl[0] | infl[1]) != 0 -> faults--;
        if :: infl[0] != 0 -> e_forget(0) :: infl[1] != 0 -> e_forget(1) fi;
        SORT2(infl)
       }
#ifdef POWERCUT
    :: atomic {
        /* the gateway loses power: outbox.db is what the last fsync left (see SYNC) */
        crashes > 0 -> crashes--;
        up = false; infl[0] = 0; infl[1] = 0;
        next_seq = s_next; undeliv = s_undeliv; telem = s_telem; nb_wm = s_nbwm;
        reserved = s_reserved;
#ifndef SEQ_REUSE
        /* the agent starts in another boot: Outbox._open_state -> SeqReservation.recover.
         * Below the reservation, sqlite_sequence jumps past it, and the skipped seqs are
         * named by an outbox_dropped report (reason power_cut) in one synced transaction */
        if
        :: next_seq <= reserved ->
           t = BIT(reserved + 1) - BIT(next_seq);     /* the skipped seqs */
           next_seq = reserved + 1;
#ifndef SKIP_UNREPORTED
           dropped = dropped | t;                      /* lost for good, and ... */
           reported = reported | t;                    /* ... named by the report */
           rep_of[next_seq] = t;
           undeliv = undeliv | BIT(next_seq);          /* the report record */
           HAND_OUT(sync);
           next_seq++;
#endif
           SYNC();
           t = 0; sync = false
        :: else -> skip
        fi
#endif
       }
#endif
    :: break    /* no more faults from here on */
    od
}

#if FORGE != 0
/* A forged or stale down/ack (a misconfigured ACL, a second central, a replayed message). */
proctype Forger() {
    byte s, mk;
    atomic {
        select (s : 1 .. MAXSEQ);
#if FORGE == 1
        /* published on the gateway's down/ack: handled whenever it arrives */
        dnq[LASTQ] == 0 -> PUTQ(dnq, BIT(s))
#else
        /* handled at once, naming a seq this uplink does not have in flight */
        up && (INFL & BIT(s)) == 0 -> e_ack(BIT(s))
#endif
    }
}
#endif

init {
    atomic {
        run Producer(); run Uplink(); run Central(); 
#ifndef NO_NB
        run Narrowband();
#endif
 run Faults();
#if FORGE != 0
        run Forger();
#endif
    }
}
