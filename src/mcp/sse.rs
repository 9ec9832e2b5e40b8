//! The one Server-Sent Events parser: an incremental reader of `text/event-stream` bytes as
//! they arrive, following the WHATWG HTML spec's "Interpreting an event stream"
//! (<https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation>):
//! a leading BOM is ignored; lines end in CRLF, LF or CR (a CRLF split across two chunks is one
//! line end); a line starting with `:` is a comment; a line without a colon is a field with an
//! empty value; one space after the colon is stripped; `data` lines are joined with `\n`; an
//! empty line dispatches the event, which has type `message` unless an `event` field named
//! another, and the type resets after every dispatch; an event without `data` is not
//! dispatched; `id` sets the last event id (which persists across events) unless it contains
//! NUL; `retry` counts only when it is all ASCII digits; unknown fields are ignored; an event
//! cut off by the end of the stream is discarded.
//!
//! Hand-written rather than taken from `sse-stream` (already in the lock file through rmcp)
//! because that crate departs from the spec where real streams differ: it fails the stream on
//! a field line without a colon, on unknown fields and on a repeated `event`/`id`/`retry`
//! (the spec ignores or overwrites), parses `retry` with surrounding spaces, dispatches events
//! that have no `data`, and keeps no last event id across events. The parser below is small
//! and tested against the spec's own examples.

use std::time::Duration;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The event type: the last `event` field of this event, else `message`.
    pub event: String,
    /// The `data` lines joined with `\n`.
    pub data: String,
    /// The last event id at dispatch (the spec's `lastEventId`: set by an `id` field of this
    /// or an earlier event, empty when none or reset by an empty `id`).
    pub id: String,
}

/// Incremental parser state. Feed it chunks in order with [`Parser::feed`] (or
/// [`Parser::next_event`] to know where an event ended within a chunk).
#[derive(Debug, Default)]
pub struct Parser {
    /// The current line so far (no line end yet).
    line: Vec<u8>,
    /// The previous chunk ended in CR: an LF starting the next one is part of that line end.
    after_cr: bool,
    /// The first line has been read (a BOM can only be at its start).
    started: bool,
    data: String,
    event_type: String,
    last_event_id: String,
    retry: Option<Duration>,
}

impl Parser {
    pub fn new() -> Parser {
        Parser::default()
    }

    /// Parses `chunk` and returns the events it completes.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Vec<Event> {
        let mut out = Vec::new();
        while !chunk.is_empty() {
            let (used, event) = self.next_event(chunk);
            out.extend(event);
            chunk = &chunk[used..];
        }
        out
    }

    /// Parses `chunk` up to the end of the first event it completes; returns how many bytes
    /// were consumed (all of them when no event completed) and the event, if one was
    /// dispatched. Callers that pass bytes through unchanged use the count to split a chunk
    /// at an event boundary.
    pub fn next_event(&mut self, chunk: &[u8]) -> (usize, Option<Event>) {
        let mut i = 0;
        if self.after_cr {
            self.after_cr = false;
            if chunk.first() == Some(&b'\n') {
                i = 1;
            }
        }
        while i < chunk.len() {
            let Some(end) = chunk[i..].iter().position(|b| *b == b'\n' || *b == b'\r') else {
                self.line.extend_from_slice(&chunk[i..]);
                return (chunk.len(), None);
            };
            let end = i + end;
            let complete = if self.line.is_empty() {
                self.process_line(&chunk[i..end])
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&chunk[i..end]);
                let event = self.process_line(&line);
                line.clear();
                self.line = line;
                event
            };
            i = end + 1;
            if chunk[end] == b'\r' {
                match chunk.get(i) {
                    Some(b'\n') => i += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            if complete.is_some() {
                return (i, complete);
            }
        }
        (chunk.len(), None)
    }

    /// The reconnection time the stream set with its last valid `retry` field.
    pub fn retry(&self) -> Option<Duration> {
        self.retry
    }

    /// The last event id so far (what a client sends as `Last-Event-ID` when it reconnects).
    pub fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    /// Bytes held for an unfinished line and event: what a caller bounding memory counts.
    pub fn buffered(&self) -> usize {
        self.line.len() + self.data.len()
    }

    fn process_line(&mut self, mut line: &[u8]) -> Option<Event> {
        if !self.started {
            self.started = true;
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        }
        if line.is_empty() {
            return self.dispatch();
        }
        if line[0] == b':' {
            return None;
        }
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(c) => {
                let value = &line[c + 1..];
                (&line[..c], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        // The stream is UTF-8 decoded with replacement characters, as the spec's decoder does.
        let value = String::from_utf8_lossy(value);
        match field {
            b"event" => self.event_type = value.into_owned(),
            b"data" => {
                self.data.push_str(&value);
                self.data.push('\n');
            }
            b"id" if !value.contains('\0') => self.last_event_id = value.into_owned(),
            b"retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                // Digits too many for u64 are no usable time either: ignored like other junk.
                if let Ok(ms) = value.parse::<u64>() {
                    self.retry = Some(Duration::from_millis(ms));
                }
            }
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<Event> {
        let event_type = std::mem::take(&mut self.event_type);
        if self.data.is_empty() {
            return None;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop(); // the `\n` after the last data line
        Some(Event {
            event: if event_type.is_empty() {
                "message".to_owned()
            } else {
                event_type
            },
            data,
            id: self.last_event_id.clone(),
        })
    }
}

/// Writes one event: `event:` (omitted for `message`), `id:` (omitted when empty), one
/// `data:` line per line of `data`, and the blank line that dispatches it.
pub fn encode(event: &str, id: &str, data: &str) -> String {
    let mut out = String::with_capacity(data.len() + event.len() + id.len() + 24);
    if event != "message" {
        out.push_str("event: ");
        out.push_str(event);
        out.push('\n');
    }
    if !id.is_empty() {
        out.push_str("id: ");
        out.push_str(id);
        out.push('\n');
    }
    for line in data.split('\n') {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: &str, data: &str, id: &str) -> Event {
        Event {
            event: event.into(),
            data: data.into(),
            id: id.into(),
        }
    }

    /// Parses `input` whole, and again split at every byte boundary, and checks both agree.
    fn parse(input: &[u8]) -> Vec<Event> {
        let whole = Parser::new().feed(input);
        for split in 1..input.len() {
            let mut p = Parser::new();
            let mut events = p.feed(&input[..split]);
            events.extend(p.feed(&input[split..]));
            assert_eq!(events, whole, "split at byte {split}");
        }
        let mut p = Parser::new();
        let bytewise: Vec<Event> = input.iter().flat_map(|b| p.feed(&[*b])).collect();
        assert_eq!(bytewise, whole, "fed one byte at a time");
        whole
    }

    // The examples below are the spec's own (section 9.2.6, "Interpreting an event stream").

    #[test]
    fn spec_example_multi_line_data() {
        // "would cause an event message with the interface MessageEvent to be dispatched on
        // the EventSource object. The event's data attribute would contain the string
        // "YHOO\n+2\n10""
        let events = parse(b"data: YHOO\ndata: +2\ndata: 10\n\n");
        assert_eq!(events, vec![ev("message", "YHOO\n+2\n10", "")]);
    }

    #[test]
    fn spec_example_comment_ids_and_leading_space() {
        // "The first block has just a comment, and will fire nothing. The second block has two
        // fields with names "data" and "id" respectively; an event will be fired for this
        // block, with the data "first event", and will then set the last event ID to "1" ...
        // The third block fires an event with data "second event", and also has an "id" field,
        // this time with no value, which resets the last event ID to the empty string ... The
        // fourth block also fires an event, with the data " third event" (with a single
        // leading space character)."
        let stream = b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n";
        let events = parse(stream);
        assert_eq!(
            events,
            vec![
                ev("message", "first event", "1"),
                ev("message", "second event", ""),
                ev("message", " third event", ""),
            ]
        );
    }

    #[test]
    fn spec_example_empty_data_fields() {
        // "The first block fires events with the data set to the empty string, as would the
        // last block if it was followed by a blank line. The middle block fires an event with
        // the data set to a single newline character. The last block is discarded because it
        // is not followed by a blank line."
        let events = parse(b"data\n\ndata\ndata\n\ndata:");
        assert_eq!(events, vec![ev("message", "", ""), ev("message", "\n", "")]);
    }

    #[test]
    fn spec_example_space_after_colon_is_optional() {
        // "The following event stream ... would cause two identical events to be dispatched"
        let events = parse(b"data:test\n\ndata: test\n\n");
        assert_eq!(events, vec![ev("message", "test", ""); 2]);
    }

    #[test]
    fn spec_example_event_types() {
        // The stock-ticker example of section 9.2.3 ("add" and "remove" events).
        let stream =
            b"event: add\ndata: 73857293\n\nevent: remove\ndata: 2153\n\nevent: add\ndata: 113411\n\n";
        let events = parse(stream);
        assert_eq!(
            events,
            vec![
                ev("add", "73857293", ""),
                ev("remove", "2153", ""),
                ev("add", "113411", ""),
            ]
        );
    }

    #[test]
    fn the_event_type_resets_after_each_dispatch() {
        let events = parse(b"event: lagged\ndata: 3\n\ndata: {}\n\n");
        assert_eq!(events, vec![ev("lagged", "3", ""), ev("message", "{}", "")]);
        // An event without data is not dispatched, and its type does not leak into the next.
        let events = parse(b"event: endpoint\n\ndata: x\n\n");
        assert_eq!(events, vec![ev("message", "x", "")]);
    }

    #[test]
    fn line_ends_may_be_crlf_lf_or_cr() {
        let events = parse(b"data: a\r\ndata: b\rdata: c\n\r\nevent: e\rdata: d\r\r");
        assert_eq!(events, vec![ev("message", "a\nb\nc", ""), ev("e", "d", "")]);
    }

    #[test]
    fn a_leading_bom_is_ignored_once() {
        assert_eq!(
            parse(b"\xEF\xBB\xBFdata: x\n\n"),
            vec![ev("message", "x", "")]
        );
        // A second BOM is part of the field name, which is then unknown.
        assert_eq!(parse(b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\n\n"), vec![]);
    }

    #[test]
    fn ids_persist_and_nul_ids_are_ignored() {
        let mut p = Parser::new();
        let events = p.feed(b"id: 7\ndata: a\n\ndata: b\n\nid: x\0y\ndata: c\n\n");
        assert_eq!(
            events,
            vec![
                ev("message", "a", "7"),
                ev("message", "b", "7"),
                ev("message", "c", "7")
            ]
        );
        assert_eq!(p.last_event_id(), "7");
    }

    #[test]
    fn retry_counts_only_when_all_digits() {
        let mut p = Parser::new();
        p.feed(b"retry: 3000\n");
        assert_eq!(p.retry(), Some(Duration::from_millis(3000)));
        for junk in [
            &b"retry: 12a\n"[..],
            b"retry:  5\n",
            b"retry: -1\n",
            b"retry:\n",
        ] {
            p.feed(junk);
            assert_eq!(p.retry(), Some(Duration::from_millis(3000)), "{junk:?}");
        }
        p.feed(b"retry:10\n");
        assert_eq!(p.retry(), Some(Duration::from_millis(10)));
    }

    #[test]
    fn unknown_fields_and_comments_are_ignored() {
        let events = parse(b": keep-alive\nfoo: bar\nevent: message\ndata: x\nbaz\n\n:\n\n");
        assert_eq!(events, vec![ev("message", "x", "")]);
    }

    #[test]
    fn mcp_priming_event_then_response() {
        // rmcp's stream (2025-11-25): a priming event with an id and empty data, then the reply.
        let events = parse(b"data: \nid: 0\nretry: 3000\n\ndata: {\"id\":1}\n\n");
        assert_eq!(
            events,
            vec![ev("message", "", "0"), ev("message", "{\"id\":1}", "0")]
        );
    }

    #[test]
    fn next_event_reports_where_the_event_ended() {
        let mut p = Parser::new();
        let chunk = b"event: endpoint\r\ndata: /m\r\n\r\nevent: message\ndata: {}\n\n";
        let (used, event) = p.next_event(chunk);
        assert_eq!(event, Some(ev("endpoint", "/m", "")));
        assert_eq!(&chunk[used..], b"event: message\ndata: {}\n\n");
    }

    #[test]
    fn encode_round_trips() {
        for (event, id, data) in [
            ("message", "", "{}"),
            ("endpoint", "4", "a\nb"),
            ("x", "", ""),
        ] {
            let text = encode(event, id, data);
            assert_eq!(
                Parser::new().feed(text.as_bytes()),
                vec![ev(event, data, id)]
            );
        }
    }
}
