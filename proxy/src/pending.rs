//! Pending: the replies a session still owes its client, in order.
//!
//! The proxy does not forward every client message unchanged: it answers some
//! itself (Close of a statement, Parse of a statement the server already has)
//! and sends some of its own (a Parse before a Bind on a connection that lacks
//! the statement). Replies must still reach the client in the order it sent
//! its messages, so every message that expects a reply gets an entry here, and
//! each server reply is matched against the entry at the head.
//!
//! Reply rules from the PostgreSQL docs, "Extended Query" and "Simple Query":
//! after an ErrorResponse to an extended-protocol message the server skips
//! everything up to the next Sync; during COPY FROM STDIN it ignores Sync and
//! Flush.

use std::collections::VecDeque;
use std::sync::Arc;

use router::SessionEffect;
use wire::backend;

/// Which server message completes an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    ParseComplete,
    BindComplete,
    CloseComplete,
    /// RowDescription or NoData (after an optional ParameterDescription).
    Description,
    /// CommandComplete, EmptyQueryResponse or PortalSuspended.
    ExecuteDone,
    /// ReadyForQuery: Sync, simple Query and FunctionCall.
    Ready,
}

impl Expect {
    fn completed_by(self, tag: u8) -> bool {
        match self {
            Expect::ParseComplete => tag == backend::PARSE_COMPLETE,
            Expect::BindComplete => tag == backend::BIND_COMPLETE,
            Expect::CloseComplete => tag == backend::CLOSE_COMPLETE,
            Expect::Description => tag == backend::ROW_DESCRIPTION || tag == backend::NO_DATA,
            Expect::ExecuteDone => matches!(
                tag,
                backend::COMMAND_COMPLETE
                    | backend::EMPTY_QUERY_RESPONSE
                    | backend::PORTAL_SUSPENDED
            ),
            Expect::Ready => tag == backend::READY_FOR_QUERY,
        }
    }
}

/// A reply the proxy makes in the server's place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalReply {
    ParseComplete,
    CloseComplete,
    BindComplete,
    NoData,
    /// CommandComplete with this tag (a BEGIN or COMMIT answered locally).
    Complete(&'static str),
}

pub type Effects = Arc<[SessionEffect]>;

#[derive(Debug, Clone)]
pub enum Entry {
    /// A client message sent on; its replies go to the client.
    Forwarded {
        expect: Expect,
        registers: Option<u64>,
        effects: Option<Effects>,
        next_effect: usize,
    },
    /// A message the proxy sent itself; its replies are not forwarded, except errors.
    Injected {
        expect: Expect,
        registers: Option<u64>,
    },
    /// A reply made by the proxy, due once everything before it is answered.
    Local(LocalReply),
    /// The client's CopyDone or CopyFail: where a COPY FROM STDIN ends.
    CopyEnd,
}

impl Entry {
    /// A client message sent on, expecting `expect`.
    pub fn forwarded(expect: Expect) -> Entry {
        Entry::Forwarded {
            expect,
            registers: None,
            effects: None,
            next_effect: 0,
        }
    }

    /// A statement text sent on, whose statements may change the session.
    pub fn with_effects(expect: Expect, effects: Option<Effects>) -> Entry {
        Entry::Forwarded {
            expect,
            registers: None,
            effects,
            next_effect: 0,
        }
    }

    /// A Parse that makes the server hold statement `hash`.
    pub fn registering(expect: Expect, hash: Option<u64>) -> Entry {
        Entry::Forwarded {
            expect,
            registers: hash,
            effects: None,
            next_effect: 0,
        }
    }
}

/// What [`Pending::pass_through`] found at the front of the server's buffer.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Run {
    /// Its length in bytes.
    pub len: usize,
    /// The status byte of the ReadyForQuery that ends it, if it takes one.
    pub ready: Option<u8>,
}

/// What to do with one server message.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Disposition {
    /// Send the message on to the client.
    pub forward: bool,
    /// Statements whose Parse failed or was skipped: no longer on the server.
    pub unregistered: Vec<u64>,
    /// A reply to nothing: the connection is out of step.
    pub unexpected: bool,
}

#[derive(Debug, Default)]
pub struct Pending {
    entries: VecDeque<Entry>,
    /// The server is skipping messages after an error and no Sync is queued yet.
    skipping_to_sync: bool,
    /// The server started COPY FROM STDIN and the client has not ended it yet:
    /// its Syncs are ignored by the server.
    copy_in_open: bool,
    /// Extended-protocol messages were sent and no Sync yet: the server may
    /// have answered them all (after a Flush, say) but is still inside the
    /// client's implicit transaction.
    unsynced: Unsynced,
}

/// What an extended-protocol batch without its Sync has left open on the
/// server, in increasing order: a batch is as open as its most open message.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Unsynced {
    #[default]
    No,
    /// Only named statements were parsed, described or closed: nothing the
    /// client could lose if the proxy synced the batch itself.
    Statements,
    /// A portal, the unnamed statement or an executed command: only the
    /// client's own Sync may end it.
    Open,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the server has answered everything and is neither skipping to
    /// a Sync after an error nor inside COPY FROM STDIN.
    fn answered(&self) -> bool {
        self.entries.is_empty() && !self.skipping_to_sync && !self.copy_in_open
    }

    /// Whether the server connection is at a message boundary: answered, and
    /// no extended-protocol batch waits for its Sync. Only then may it be
    /// handed to another client.
    pub fn is_idle(&self) -> bool {
        self.answered() && self.unsynced == Unsynced::No
    }

    /// Whether the server has answered a batch that only prepared, described
    /// or closed named statements: the proxy may send a Sync of its own and
    /// free the connection (asyncpg's prepare sends Parse, Describe, Flush and
    /// may then idle for a long time).
    pub fn can_sync_early(&self) -> bool {
        self.answered() && self.unsynced == Unsynced::Statements
    }

    /// The batch now holds a portal, the unnamed statement or a command.
    pub fn note_open(&mut self) {
        self.unsynced = Unsynced::Open;
    }

    /// Whether a Parse sent now would be skipped by the server.
    pub fn is_skipping(&self) -> bool {
        self.skipping_to_sync
    }

    /// Queues an entry for a message just sent (or answered locally).
    /// Local replies due at once are appended to `out`.
    pub fn push(&mut self, entry: Entry, out: &mut bytes::BytesMut) {
        if matches!(entry, Entry::Forwarded { .. } | Entry::Injected { .. }) {
            // Cleared below if this is the Sync.
            self.unsynced = self.unsynced.max(Unsynced::Statements);
        }
        match &entry {
            Entry::Forwarded {
                expect: Expect::Ready,
                ..
            } if self.copy_in_open => return,
            Entry::Forwarded {
                expect: Expect::Ready,
                ..
            }
            | Entry::Injected {
                expect: Expect::Ready,
                ..
            } => {
                self.skipping_to_sync = false;
                self.unsynced = Unsynced::No;
            }
            Entry::CopyEnd if self.copy_in_open => {
                self.copy_in_open = false;
                return;
            }
            _ if self.skipping_to_sync => return,
            _ => {}
        }
        self.entries.push_back(entry);
        self.drain_local(out);
    }

    /// Matches one server message against the head entry. Local replies due
    /// before it are appended to `out` first; the caller appends the message
    /// itself (if `forward`) and then calls [`Pending::drain_local`].
    pub fn on_server_message(&mut self, tag: u8, out: &mut bytes::BytesMut) -> Disposition {
        self.drain_local(out);
        let mut d = Disposition {
            forward: true,
            ..Disposition::default()
        };
        match tag {
            // Asynchronous messages may arrive at any time and always go through.
            backend::NOTICE_RESPONSE
            | backend::PARAMETER_STATUS
            | backend::NOTIFICATION_RESPONSE => return d,
            backend::ERROR_RESPONSE => {
                self.on_error(&mut d);
                return d;
            }
            backend::COPY_IN_RESPONSE | backend::COPY_BOTH_RESPONSE => self.on_copy_in(),
            _ => {}
        }
        let (expect, injected) = match self.entries.front() {
            Some(Entry::Forwarded { expect, .. }) => (*expect, false),
            Some(Entry::Injected { expect, .. }) => (*expect, true),
            // Local entries were drained above, so this is a reply to nothing.
            Some(Entry::Local(_) | Entry::CopyEnd) | None => {
                d.forward = false;
                d.unexpected = true;
                return d;
            }
        };
        d.forward = !injected;
        if expect.completed_by(tag) {
            self.entries.pop_front();
        }
        d
    }

    /// The run of complete server messages at the front of `buf` that only
    /// pass through: replies to client messages sent on (rows, descriptions,
    /// completions) that change nothing but which entry is at the head,
    /// which this pops. With `ready`, the ReadyForQuery that answers a
    /// client's Sync or Query ends the run, its status in [`Run::ready`]
    /// (the caller forwards it unchanged and ends the request). Stops before
    /// anything else: an error, any other ReadyForQuery, a COPY IN, a
    /// ParameterStatus (the session looks at those), a CommandComplete
    /// unless `commands` (and the head has no session effects), a message
    /// whose body is longer than `body_max`, and once the run reaches
    /// `room` bytes. Matches what [`Pending::on_server_message`] does for
    /// each message, one message at a time.
    pub fn pass_through(
        &mut self,
        buf: &[u8],
        commands: bool,
        ready: bool,
        body_max: usize,
        room: usize,
    ) -> Run {
        let mut run = Run::default();
        let Some(Entry::Forwarded {
            expect, effects, ..
        }) = self.entries.front()
        else {
            return run;
        };
        let (mut expect, mut commands_here) = (*expect, commands && effects.is_none());
        while run.len < room {
            let rest = &buf[run.len..];
            let Some(&[tag, l0, l1, l2, l3]) = rest.get(..wire::HEADER_LEN) else {
                break;
            };
            let len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
            if len < 4 || len - 4 > body_max || rest.len() <= len {
                break;
            }
            match tag {
                backend::READY_FOR_QUERY if ready && expect == Expect::Ready && len == 5 => {
                    run.len += 1 + len;
                    run.ready = Some(rest[wire::HEADER_LEN]);
                    self.entries.pop_front();
                    break;
                }
                backend::ERROR_RESPONSE
                | backend::READY_FOR_QUERY
                | backend::PARAMETER_STATUS
                | backend::COPY_IN_RESPONSE
                | backend::COPY_BOTH_RESPONSE => break,
                backend::COMMAND_COMPLETE if !commands_here => break,
                _ => {}
            }
            run.len += 1 + len;
            if expect.completed_by(tag) {
                self.entries.pop_front();
                match self.entries.front() {
                    Some(Entry::Forwarded {
                        expect: next,
                        effects,
                        ..
                    }) => (expect, commands_here) = (*next, commands && effects.is_none()),
                    _ => break,
                }
            }
        }
        run
    }

    /// The session effect of the statement a CommandComplete with `tag` just
    /// completed, if the head entry's text has effects and the tag is one of
    /// theirs. Effects are consumed in statement order.
    pub fn take_effect(&mut self, tag: &[u8]) -> Option<SessionEffect> {
        let Some(Entry::Forwarded {
            effects: Some(effects),
            next_effect,
            ..
        }) = self.entries.front_mut()
        else {
            return None;
        };
        if !SessionEffect::completes_with(tag) {
            return None;
        }
        let effect = effects.get(*next_effect)?.clone();
        *next_effect += 1;
        Some(effect)
    }

    /// Whether the head entry carries session effects.
    pub fn head_has_effects(&self) -> bool {
        matches!(
            self.entries.front(),
            Some(Entry::Forwarded {
                effects: Some(_),
                ..
            })
        )
    }

    /// Whether the head entry expects something from the server.
    pub fn awaits_server(&self) -> bool {
        !self.entries.is_empty()
    }

    fn on_error(&mut self, d: &mut Disposition) {
        d.forward = true;
        // An error ends COPY FROM STDIN; the client's later Syncs count again.
        self.copy_in_open = false;
        match self.entries.front() {
            // A simple Query or Sync goes on to ReadyForQuery after an error.
            Some(
                Entry::Forwarded {
                    expect: Expect::Ready,
                    ..
                }
                | Entry::Injected {
                    expect: Expect::Ready,
                    ..
                },
            )
            | None => {}
            Some(_) => {
                // The server now skips to the next Sync: so do the replies.
                while let Some(entry) = self.entries.front() {
                    match entry {
                        Entry::Forwarded {
                            expect: Expect::Ready,
                            ..
                        } => break,
                        Entry::Forwarded {
                            registers: Some(h), ..
                        }
                        | Entry::Injected {
                            registers: Some(h), ..
                        } => d.unregistered.push(*h),
                        _ => {}
                    }
                    self.entries.pop_front();
                }
                if self.entries.is_empty() {
                    self.skipping_to_sync = true;
                }
            }
        }
    }

    /// The server entered COPY FROM STDIN: Syncs the client sent between the
    /// COPY and its CopyDone/CopyFail will be ignored, so expect no reply.
    fn on_copy_in(&mut self) {
        let mut i = 1;
        while i < self.entries.len() {
            match self.entries[i] {
                Entry::CopyEnd => {
                    self.entries.remove(i);
                    return;
                }
                Entry::Forwarded {
                    expect: Expect::Ready,
                    ..
                } => {
                    self.entries.remove(i);
                }
                _ => i += 1,
            }
        }
        self.copy_in_open = true;
    }

    /// Appends the local replies now due.
    #[inline]
    pub fn drain_local(&mut self, out: &mut bytes::BytesMut) {
        if matches!(self.entries.front(), Some(Entry::Local(_) | Entry::CopyEnd)) {
            self.drain_local_due(out);
        }
    }

    fn drain_local_due(&mut self, out: &mut bytes::BytesMut) {
        while let Some(entry) = self.entries.front() {
            match entry {
                Entry::Local(LocalReply::ParseComplete) => {
                    wire::backend::encode_parse_complete(out)
                }
                Entry::Local(LocalReply::CloseComplete) => {
                    wire::backend::encode_close_complete(out)
                }
                Entry::Local(LocalReply::BindComplete) => {
                    wire::rows::encode_empty(out, backend::BIND_COMPLETE)
                }
                Entry::Local(LocalReply::NoData) => wire::rows::encode_empty(out, backend::NO_DATA),
                Entry::Local(LocalReply::Complete(tag)) => {
                    wire::rows::encode_command_complete(out, tag.as_bytes())
                }
                Entry::CopyEnd => {}
                _ => return,
            }
            self.entries.pop_front();
        }
    }

    /// Forgets everything; used when the server connection is dropped.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.skipping_to_sync = false;
        self.copy_in_open = false;
        self.unsynced = Unsynced::No;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn fwd(expect: Expect) -> Entry {
        Entry::forwarded(expect)
    }

    #[test]
    fn local_replies_wait_for_earlier_server_replies() {
        let mut p = Pending::default();
        let mut out = BytesMut::new();
        p.push(fwd(Expect::BindComplete), &mut out);
        p.push(Entry::Local(LocalReply::CloseComplete), &mut out);
        p.push(fwd(Expect::Ready), &mut out);
        assert!(out.is_empty());
        assert!(
            p.on_server_message(backend::BIND_COMPLETE, &mut out)
                .forward
        );
        assert!(out.is_empty(), "the BindComplete goes first");
        p.drain_local(&mut out);
        assert_eq!(&out[..], b"3\0\0\0\x04");
        assert!(
            p.on_server_message(backend::READY_FOR_QUERY, &mut out)
                .forward
        );
        assert!(p.is_empty());
    }

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut f = vec![tag];
        f.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn pass_through_matches_message_by_message() {
        use backend::*;
        let simple = [fwd(Expect::Ready)];
        let extended = [
            fwd(Expect::ParseComplete),
            fwd(Expect::BindComplete),
            fwd(Expect::Description),
            fwd(Expect::ExecuteDone),
            fwd(Expect::Ready),
        ];
        let local_next = [
            fwd(Expect::ParseComplete),
            Entry::Local(LocalReply::CloseComplete),
            fwd(Expect::Ready),
        ];
        let injected = [
            Entry::Injected {
                expect: Expect::ParseComplete,
                registers: None,
            },
            fwd(Expect::Ready),
        ];
        let effects = [Entry::with_effects(Expect::Ready, Some(Arc::from([])))];
        let reply = [ROW_DESCRIPTION, DATA_ROW, COMMAND_COMPLETE, READY_FOR_QUERY];
        let extended_reply = [
            PARSE_COMPLETE,
            BIND_COMPLETE,
            ROW_DESCRIPTION,
            DATA_ROW,
            COMMAND_COMPLETE,
            READY_FOR_QUERY,
        ];
        #[rustfmt::skip]
        let cases: &[(&str, &[Entry], &[u8], bool, bool, usize, usize)] = &[
            // name, entries, reply tags, commands, ready, room, frames passed
            ("simple", &simple, &reply, true, false, usize::MAX, 3),
            ("simple, to its ReadyForQuery", &simple, &reply, true, true, usize::MAX, 4),
            ("simple, commands held back", &simple, &reply, false, true, usize::MAX, 2),
            ("simple, statement with effects", &effects, &reply, true, true, usize::MAX, 2),
            ("extended", &extended, &extended_reply, true, false, usize::MAX, 5),
            ("extended, to its ReadyForQuery", &extended, &extended_reply, true, true, usize::MAX, 6),
            ("extended, commands held back", &extended, &extended_reply, false, true, usize::MAX, 4),
            ("a local reply is due after the first", &local_next, &[PARSE_COMPLETE, READY_FOR_QUERY], true, true, usize::MAX, 1),
            ("injected", &injected, &[PARSE_COMPLETE, READY_FOR_QUERY], true, true, usize::MAX, 0),
            ("error", &simple, &[NOTICE_RESPONSE, ERROR_RESPONSE, READY_FOR_QUERY], true, true, usize::MAX, 1),
            ("copy in", &simple, &[COPY_IN_RESPONSE], true, true, usize::MAX, 0),
            ("room for one", &simple, &reply, true, true, 1, 1),
            ("nothing owed", &[], &reply, true, true, usize::MAX, 0),
        ];
        for &(name, entries, tags, commands, ready, room, passed) in cases {
            let mut buf = Vec::new();
            let mut ends = vec![0];
            for &tag in tags {
                let body: &[u8] = if tag == READY_FOR_QUERY { b"I" } else { b"x\0" };
                buf.extend(frame(tag, body));
                ends.push(buf.len());
            }
            let (mut fast, mut slow) = (Pending::default(), Pending::default());
            let mut out = BytesMut::new();
            for e in entries {
                fast.push(e.clone(), &mut out);
                slow.push(e.clone(), &mut out);
            }
            let run = fast.pass_through(&buf, commands, ready, 1 << 20, room);
            assert_eq!(run.len, ends[passed], "{name}");
            let took_ready = passed > 0 && tags[passed - 1] == READY_FOR_QUERY;
            assert_eq!(run.ready, took_ready.then_some(b'I'), "{name}");
            for &tag in &tags[..passed] {
                let d = slow.on_server_message(tag, &mut out);
                assert!(
                    d.forward && !d.unexpected && d.unregistered.is_empty(),
                    "{name}"
                );
            }
            assert!(out.is_empty(), "{name}");
            assert_eq!(format!("{fast:?}"), format!("{slow:?}"), "{name}");
            // An incomplete frame is not passed.
            let mut fast = Pending::default();
            for e in entries {
                fast.push(e.clone(), &mut out);
            }
            let cut = ends[passed]
                .saturating_sub(1)
                .max(ends[passed.saturating_sub(1)]);
            let run = fast.pass_through(&buf[..cut], commands, ready, 1 << 20, room);
            assert_eq!(run.len, ends[passed.saturating_sub(1)], "{name}, cut short");
        }
        // A message longer than the caller's limit is left to it.
        let mut p = Pending::default();
        p.push(fwd(Expect::Ready), &mut BytesMut::new());
        let row = frame(DATA_ROW, &[7; 100]);
        assert_eq!(p.pass_through(&row, true, true, 99, usize::MAX).len, 0);
        assert_eq!(
            p.pass_through(&row, true, true, 100, usize::MAX).len,
            row.len()
        );
    }

    #[test]
    fn error_skips_to_sync_and_unregisters() {
        let mut p = Pending::default();
        let mut out = BytesMut::new();
        p.push(
            Entry::Injected {
                expect: Expect::ParseComplete,
                registers: Some(7),
            },
            &mut out,
        );
        p.push(fwd(Expect::BindComplete), &mut out);
        p.push(Entry::Local(LocalReply::ParseComplete), &mut out);
        p.push(fwd(Expect::ExecuteDone), &mut out);
        p.push(fwd(Expect::Ready), &mut out);
        let d = p.on_server_message(backend::ERROR_RESPONSE, &mut out);
        assert!(d.forward);
        assert_eq!(d.unregistered, vec![7]);
        p.drain_local(&mut out);
        assert!(out.is_empty(), "no ParseComplete after an error");
        assert!(
            p.on_server_message(backend::READY_FOR_QUERY, &mut out)
                .forward
        );
        assert!(p.is_empty());
    }

    #[test]
    fn injected_replies_are_swallowed() {
        let mut p = Pending::default();
        let mut out = BytesMut::new();
        p.push(
            Entry::Injected {
                expect: Expect::ParseComplete,
                registers: Some(1),
            },
            &mut out,
        );
        p.push(fwd(Expect::BindComplete), &mut out);
        assert!(
            !p.on_server_message(backend::PARSE_COMPLETE, &mut out)
                .forward
        );
        assert!(
            p.on_server_message(backend::BIND_COMPLETE, &mut out)
                .forward
        );
    }

    #[test]
    fn syncs_inside_copy_in_expect_no_reply() {
        let mut p = Pending::default();
        let mut out = BytesMut::new();
        p.push(fwd(Expect::ExecuteDone), &mut out);
        p.push(fwd(Expect::Ready), &mut out); // ignored by the server: sent during COPY
        p.on_server_message(backend::COPY_IN_RESPONSE, &mut out);
        p.push(Entry::CopyEnd, &mut out);
        p.push(fwd(Expect::Ready), &mut out);
        p.on_server_message(backend::COMMAND_COMPLETE, &mut out);
        p.on_server_message(backend::READY_FOR_QUERY, &mut out);
        assert!(p.is_empty());
    }

    #[test]
    fn a_connection_skipping_to_sync_or_in_copy_is_not_idle() {
        let mut p = Pending::default();
        let mut out = BytesMut::new();
        p.push(fwd(Expect::ExecuteDone), &mut out);
        p.on_server_message(backend::COPY_IN_RESPONSE, &mut out);
        p.on_server_message(backend::ERROR_RESPONSE, &mut out);
        assert!(p.is_empty());
        assert!(!p.is_idle(), "the server still waits for a Sync");
        p.push(Entry::CopyEnd, &mut out);
        p.push(fwd(Expect::Ready), &mut out);
        p.on_server_message(backend::READY_FOR_QUERY, &mut out);
        assert!(p.is_idle());
    }

    #[test]
    fn answered_but_unsynced_batches_keep_the_connection() {
        let mut p = Pending::default();
        let mut out = BytesMut::new();
        p.push(fwd(Expect::BindComplete), &mut out);
        p.push(fwd(Expect::ExecuteDone), &mut out); // then Flush, no Sync
        p.on_server_message(backend::BIND_COMPLETE, &mut out);
        p.on_server_message(backend::PORTAL_SUSPENDED, &mut out);
        assert!(p.is_empty());
        assert!(
            !p.is_idle(),
            "the portal and implicit transaction are still open"
        );
        p.push(fwd(Expect::Ready), &mut out);
        p.on_server_message(backend::READY_FOR_QUERY, &mut out);
        assert!(p.is_idle());
    }

    #[test]
    fn statement_only_batches_may_be_synced_early() {
        let mut p = Pending::default();
        let mut out = BytesMut::new();
        p.push(fwd(Expect::ParseComplete), &mut out);
        p.push(fwd(Expect::Description), &mut out); // then Flush, no Sync
        p.on_server_message(backend::PARSE_COMPLETE, &mut out);
        p.on_server_message(backend::ROW_DESCRIPTION, &mut out);
        assert!(!p.is_idle());
        assert!(p.can_sync_early());
        p.push(fwd(Expect::BindComplete), &mut out);
        p.note_open();
        p.on_server_message(backend::BIND_COMPLETE, &mut out);
        assert!(!p.can_sync_early(), "a portal is open");
    }

    #[test]
    fn error_without_queued_sync_skips_later_messages() {
        let mut p = Pending::default();
        let mut out = BytesMut::new();
        p.push(fwd(Expect::BindComplete), &mut out);
        p.on_server_message(backend::ERROR_RESPONSE, &mut out);
        p.push(fwd(Expect::ExecuteDone), &mut out);
        p.push(Entry::Local(LocalReply::CloseComplete), &mut out);
        assert!(out.is_empty());
        p.push(fwd(Expect::Ready), &mut out);
        p.on_server_message(backend::READY_FOR_QUERY, &mut out);
        assert!(p.is_empty());
    }
}
