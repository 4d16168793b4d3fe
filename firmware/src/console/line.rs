//! The serial console's line editor: raw bytes from the serial port in, completed command lines
//! and the bytes to echo out. Sans-IO: it never touches the port, so the runtime decides what
//! to do with a full output buffer (drop console output, never anything else).
//!
//! The editor owns one input line and a ring of past lines, all allocated once in
//! [`LineEditor::new`]; nothing grows with what arrives. Whatever arrives (binary noise, a cable plugged in mid-byte,
//! a megabyte without a newline) never panics and leaves the editor usable: the line stops
//! growing at [`CONSOLE_LINE_BYTES_MAX`] (refused bytes ring the bell), bytes the console does
//! not understand are ignored, and an escape sequence is dropped as soon as it turns out to be
//! garbage or longer than any key sends. Ctrl-C and Enter work in every state.
//!
//! Keys:
//!
//! | bytes                                   | effect                                          |
//! |-----------------------------------------|-------------------------------------------------|
//! | printable ASCII (0x20..=0x7e)           | inserted at the cursor (bell when the line is full) |
//! | `\r`, `\n`, `\r\n` (counted once)       | completes the line                              |
//! | 0x7f, 0x08 (Backspace)                  | deletes before the cursor                       |
//! | 0x03 (Ctrl-C)                           | abandons the line: `^C` and a new prompt        |
//! | 0x15 (Ctrl-U)                           | clears the line                                 |
//! | 0x01 / 0x05 (Ctrl-A / Ctrl-E)           | start / end of the line                         |
//! | 0x0c (Ctrl-L)                           | redraws the prompt and the line                 |
//! | `ESC [ A` / `ESC O A` (Up)              | older history entry                             |
//! | `ESC [ B` / `ESC O B` (Down)            | newer history entry, then the line being typed  |
//! | `ESC [ C`, `ESC [ D` (Right, Left)      | moves the cursor                                |
//! | `ESC [ H`, `ESC [ F`, `ESC [ 1 ~`, `ESC [ 4 ~` | Home, End                                |
//! | `ESC [ 3 ~` (Delete)                    | deletes at the cursor                           |
//! | anything else                           | ignored                                         |
//!
//! Output uses `\r\n` line ends (the port is raw, nothing translates `\n`) and a few VT100
//! sequences: `\r`, `ESC [ K` (erase to the end of the line), `ESC [ n D` (cursor left). The
//! redraw assumes prompt and line fit on one terminal row; a longer line still edits correctly
//! but may look untidy on an 80-column terminal.

/// The longest input line, in bytes. Longer input is refused with a bell.
pub const CONSOLE_LINE_BYTES_MAX: usize = 512;

/// Past lines kept for Up/Down.
pub const CONSOLE_HISTORY_COUNT_MAX: usize = 32;

/// The longest prompt, in bytes; a longer one is cut.
pub const CONSOLE_PROMPT_BYTES_MAX: usize = 64;

/// Parameter and intermediate bytes kept of one escape sequence. Keys send at most a handful
/// (`ESC [ 1 ; 5 A`); a longer sequence is garbage and is dropped.
const ESCAPE_BYTES_MAX: usize = 8;

/// The most bytes [`LineEditor::feed_byte`] appends to the echo for one input byte (a
/// history recall redraws prompt and line), so a caller that feeds bounded reads knows how
/// large its output gets.
pub const CONSOLE_ECHO_BYTES_PER_INPUT_MAX: usize =
    CONSOLE_PROMPT_BYTES_MAX + CONSOLE_LINE_BYTES_MAX + 16;

const _: () = assert!(CONSOLE_HISTORY_COUNT_MAX >= 1);

const BELL: u8 = 0x07;
const ERASE_TO_END: &[u8] = b"\x1b[K";

/// What one input byte (or a run of them) completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineEvent {
    /// Enter on a line that is not blank: the line as typed (printable ASCII only). After
    /// [`LineEditor::set_blank_lines`], Enter on a blank line too, as an empty string.
    Line(String),
    /// Ctrl-C: the line was abandoned.
    Cancelled,
    /// Nothing completed (a key was edited in, or ignored, or Enter on a blank line).
    Nothing,
}

/// One line of bytes with a fixed capacity.
#[derive(Clone, Copy)]
struct LineBuf {
    bytes: [u8; CONSOLE_LINE_BYTES_MAX],
    len: usize,
}

impl LineBuf {
    const EMPTY: LineBuf = LineBuf {
        bytes: [0; CONSOLE_LINE_BYTES_MAX],
        len: 0,
    };

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    fn copy_from(&mut self, other: &LineBuf) {
        self.bytes[..other.len].copy_from_slice(other.as_slice());
        self.len = other.len;
    }
}

/// Where the escape-sequence parser is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    /// Not in a sequence.
    Idle,
    /// After ESC.
    Start,
    /// After `ESC [`: parameter and intermediate bytes until a final byte.
    Csi,
    /// After `ESC O`: one final byte.
    Ss3,
}

/// The keys escape sequences stand for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Up,
    Down,
    Left,
    Right,
    Home,
    End,
    Delete,
}

/// The serial console's line editor (see the module documentation).
pub struct LineEditor {
    prompt: String,
    line: LineBuf,
    /// Index into `line` where the next byte goes; `cursor <= line.len`.
    cursor: usize,
    /// A ring of past lines; `history_count` of them are valid, the newest just before
    /// `history_next`.
    history: Box<[LineBuf]>,
    history_count: usize,
    history_next: usize,
    /// While walking the history: how far back (0 = newest).
    browse: Option<usize>,
    /// The line being typed when the walk began, restored by Down past the newest entry.
    draft: Box<LineBuf>,
    escape: Escape,
    escape_len: usize,
    escape_bytes: [u8; ESCAPE_BYTES_MAX],
    /// The previous byte was `\r`, so a `\n` right after it belongs to the same Enter.
    after_cr: bool,
    /// Enter on a blank line yields an empty [`LineEvent::Line`] (see [`Self::set_blank_lines`]).
    blank_lines: bool,
}

impl std::fmt::Debug for LineEditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineEditor")
            .field("prompt", &self.prompt)
            .field("input", &self.input())
            .field("cursor", &self.cursor)
            .field("history_count", &self.history_count)
            .field("browse", &self.browse)
            .field("escape", &self.escape)
            .finish()
    }
}

impl LineEditor {
    /// An editor with an empty line and no history. Nothing is drawn until [`Self::redraw`].
    pub fn new(prompt: String) -> Self {
        let mut editor = LineEditor {
            prompt: String::new(),
            line: LineBuf::EMPTY,
            cursor: 0,
            history: vec![LineBuf::EMPTY; CONSOLE_HISTORY_COUNT_MAX].into_boxed_slice(),
            history_count: 0,
            history_next: 0,
            browse: None,
            draft: Box::new(LineBuf::EMPTY),
            escape: Escape::Idle,
            escape_len: 0,
            escape_bytes: [0; ESCAPE_BYTES_MAX],
            after_cr: false,
            blank_lines: false,
        };
        editor.set_prompt(prompt);
        editor
    }

    /// Replaces the prompt (it shows node and role, so it changes with the role). Only
    /// printable ASCII is kept, at most [`CONSOLE_PROMPT_BYTES_MAX`] bytes. Nothing is drawn:
    /// the next [`Self::print_above`] or [`Self::redraw`] shows it.
    pub fn set_prompt(&mut self, prompt: String) {
        self.prompt =
            if prompt.bytes().all(is_printable) && prompt.len() <= CONSOLE_PROMPT_BYTES_MAX {
                prompt
            } else {
                prompt
                    .chars()
                    .filter(|c| c.is_ascii() && is_printable(*c as u8))
                    .take(CONSOLE_PROMPT_BYTES_MAX)
                    .collect()
            };
    }

    /// With `true`, Enter on a blank line completes it as an empty [`LineEvent::Line`] instead of
    /// nothing: a dialog whose questions have defaults takes Enter as "the default". Blank lines
    /// still stay out of the history.
    pub fn set_blank_lines(&mut self, on: bool) {
        self.blank_lines = on;
    }

    /// The prompt as drawn.
    pub fn prompt(&self) -> &str {
        &self.prompt
    }

    /// The line being typed.
    pub fn input(&self) -> &str {
        // Only printable ASCII is ever inserted, so this never fails.
        std::str::from_utf8(self.line.as_slice()).unwrap_or("")
    }

    /// The cursor's position in [`Self::input`].
    pub fn cursor(&self) -> usize {
        self.cursor
    }

    /// Feeds raw bytes from the serial port. Appends what must be echoed to `echo` and returns
    /// the completed lines and cancellations in order (never [`LineEvent::Nothing`]); both are
    /// bounded by `bytes.len()` (at most one event and [`CONSOLE_ECHO_BYTES_PER_INPUT_MAX`] echo
    /// bytes per input byte), so the caller bounds them by reading the port in bounded chunks.
    ///
    /// The echo of a completed line ends with the next prompt; a reply printed afterwards with
    /// [`Self::print_above`] lands between the two prompts. When one chunk holds several lines
    /// and each reply must follow its own line, use [`Self::feed_byte`] instead.
    pub fn feed(&mut self, bytes: &[u8], echo: &mut Vec<u8>) -> Vec<LineEvent> {
        let mut events = Vec::new();
        for &byte in bytes {
            match self.feed_byte(byte, echo) {
                LineEvent::Nothing => {}
                event => events.push(event),
            }
        }
        events
    }

    /// Feeds one raw byte; appends at most [`CONSOLE_ECHO_BYTES_PER_INPUT_MAX`] bytes to `echo`.
    pub fn feed_byte(&mut self, byte: u8, echo: &mut Vec<u8>) -> LineEvent {
        let after_cr = std::mem::replace(&mut self.after_cr, false);
        match self.escape {
            Escape::Idle => {}
            Escape::Start => {
                self.escape = Escape::Idle;
                match byte {
                    b'[' => {
                        self.escape = Escape::Csi;
                        self.escape_len = 0;
                        return LineEvent::Nothing;
                    }
                    b'O' => {
                        self.escape = Escape::Ss3;
                        return LineEvent::Nothing;
                    }
                    // Control bytes (Enter, Ctrl-C, another ESC) keep their meaning.
                    0x00..=0x1f => {}
                    // ESC + key (Alt-key) and anything else: ignored.
                    _ => return LineEvent::Nothing,
                }
            }
            Escape::Csi => match byte {
                // Parameter (0x30..=0x3f) and intermediate (0x20..=0x2f) bytes.
                0x20..=0x3f => {
                    if self.escape_len < ESCAPE_BYTES_MAX {
                        self.escape_bytes[self.escape_len] = byte;
                        self.escape_len += 1;
                    } else {
                        // No key sends this much: garbage. Drop the sequence.
                        self.escape = Escape::Idle;
                    }
                    return LineEvent::Nothing;
                }
                0x40..=0x7e => {
                    self.escape = Escape::Idle;
                    if let Some(key) = csi_key(byte, &self.escape_bytes[..self.escape_len]) {
                        self.handle_key(key, echo);
                    }
                    return LineEvent::Nothing;
                }
                // Not part of a sequence: drop the sequence and take the byte as it is.
                _ => self.escape = Escape::Idle,
            },
            Escape::Ss3 => {
                self.escape = Escape::Idle;
                if (0x40..=0x7e).contains(&byte) {
                    if let Some(key) = ss3_key(byte) {
                        self.handle_key(key, echo);
                    }
                    return LineEvent::Nothing;
                }
            }
        }
        match byte {
            b'\r' => {
                self.after_cr = true;
                self.complete(echo)
            }
            b'\n' if after_cr => LineEvent::Nothing,
            b'\n' => self.complete(echo),
            0x03 => self.cancel(echo),
            0x7f | 0x08 => {
                self.backspace(echo);
                LineEvent::Nothing
            }
            0x15 => {
                self.line.len = 0;
                self.cursor = 0;
                self.redraw(echo);
                LineEvent::Nothing
            }
            0x01 => {
                self.handle_key(Key::Home, echo);
                LineEvent::Nothing
            }
            0x05 => {
                self.handle_key(Key::End, echo);
                LineEvent::Nothing
            }
            0x0c => {
                self.redraw(echo);
                LineEvent::Nothing
            }
            0x1b => {
                self.escape = Escape::Start;
                LineEvent::Nothing
            }
            byte if is_printable(byte) => {
                self.insert(byte, echo);
                LineEvent::Nothing
            }
            // Other control bytes, and everything above ASCII: the console is ASCII.
            _ => LineEvent::Nothing,
        }
    }

    /// Prints `text` (the node's log lines or a command's reply) while the user may be typing:
    /// erases the input row, prints each line of `text` with `\r\n`, and redraws prompt and
    /// input with the cursor where it was. Control characters in `text` other than tab are shown
    /// as `?`, so nothing printed can reprogram the operator's terminal.
    pub fn print_above(&self, text: &str, out: &mut Vec<u8>) {
        out.push(b'\r');
        out.extend_from_slice(ERASE_TO_END);
        for line in text.lines() {
            for c in line.chars() {
                if c == '\t' || !c.is_control() {
                    let mut utf8 = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
                } else {
                    out.push(b'?');
                }
            }
            out.extend_from_slice(b"\r\n");
        }
        self.draw_prompt_and_input(out);
    }

    /// Redraws the prompt and the input on the current row (for the first prompt, and after
    /// [`Self::set_prompt`] when nothing else is printed).
    pub fn redraw(&self, out: &mut Vec<u8>) {
        out.push(b'\r');
        self.draw_prompt_and_input(out);
    }

    /// Prompt, input, the rest of the row erased (it may hold a longer line drawn before), and
    /// the cursor moved back to its place.
    fn draw_prompt_and_input(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.prompt.as_bytes());
        out.extend_from_slice(self.line.as_slice());
        out.extend_from_slice(ERASE_TO_END);
        move_left(self.line.len - self.cursor, out);
    }

    fn complete(&mut self, echo: &mut Vec<u8>) -> LineEvent {
        echo.extend_from_slice(b"\r\n");
        let event = if self.line.as_slice().iter().all(|b| *b == b' ') {
            if self.blank_lines {
                LineEvent::Line(String::new())
            } else {
                LineEvent::Nothing
            }
        } else {
            self.remember();
            LineEvent::Line(self.input().to_string())
        };
        self.clear();
        echo.extend_from_slice(self.prompt.as_bytes());
        event
    }

    fn cancel(&mut self, echo: &mut Vec<u8>) -> LineEvent {
        echo.extend_from_slice(b"^C\r\n");
        self.clear();
        echo.extend_from_slice(self.prompt.as_bytes());
        LineEvent::Cancelled
    }

    fn clear(&mut self) {
        self.line.len = 0;
        self.cursor = 0;
        self.browse = None;
    }

    /// Adds the current line to the history unless it repeats the newest entry.
    fn remember(&mut self) {
        if self.history_entry(0).map(LineBuf::as_slice) == Some(self.line.as_slice()) {
            return;
        }
        self.history[self.history_next].copy_from(&self.line);
        self.history_next = (self.history_next + 1) % CONSOLE_HISTORY_COUNT_MAX;
        self.history_count = (self.history_count + 1).min(CONSOLE_HISTORY_COUNT_MAX);
    }

    /// The history entry `back` lines ago (0 = newest).
    fn history_entry(&self, back: usize) -> Option<&LineBuf> {
        if back >= self.history_count {
            return None;
        }
        let slot =
            (self.history_next + CONSOLE_HISTORY_COUNT_MAX - 1 - back) % CONSOLE_HISTORY_COUNT_MAX;
        Some(&self.history[slot])
    }

    fn insert(&mut self, byte: u8, echo: &mut Vec<u8>) {
        let len = self.line.len;
        if len == CONSOLE_LINE_BYTES_MAX {
            echo.push(BELL);
            return;
        }
        self.line
            .bytes
            .copy_within(self.cursor..len, self.cursor + 1);
        self.line.bytes[self.cursor] = byte;
        self.line.len = len + 1;
        self.cursor += 1;
        // Echo the byte and, when inserting in the middle, the rest of the line after it.
        echo.extend_from_slice(&self.line.bytes[self.cursor - 1..self.line.len]);
        move_left(self.line.len - self.cursor, echo);
    }

    fn backspace(&mut self, echo: &mut Vec<u8>) {
        if self.cursor == 0 {
            return;
        }
        echo.push(0x08);
        self.cursor -= 1;
        self.delete_at_cursor(echo);
    }

    /// Removes the byte under the cursor and redraws the rest of the line, which moves left by
    /// one.
    fn delete_at_cursor(&mut self, echo: &mut Vec<u8>) {
        let len = self.line.len;
        if self.cursor == len {
            return;
        }
        self.line
            .bytes
            .copy_within(self.cursor + 1..len, self.cursor);
        self.line.len = len - 1;
        echo.extend_from_slice(&self.line.bytes[self.cursor..self.line.len]);
        echo.push(b' ');
        move_left(self.line.len - self.cursor + 1, echo);
    }

    fn handle_key(&mut self, key: Key, echo: &mut Vec<u8>) {
        match key {
            Key::Left => {
                if self.cursor > 0 {
                    self.cursor -= 1;
                    echo.push(0x08);
                }
            }
            Key::Right => {
                if self.cursor < self.line.len {
                    // Printing the byte under the cursor moves right by one.
                    echo.push(self.line.bytes[self.cursor]);
                    self.cursor += 1;
                }
            }
            Key::Home => {
                move_left(self.cursor, echo);
                self.cursor = 0;
            }
            Key::End => {
                echo.extend_from_slice(&self.line.bytes[self.cursor..self.line.len]);
                self.cursor = self.line.len;
            }
            Key::Delete => self.delete_at_cursor(echo),
            Key::Up => {
                let back = self.browse.map_or(0, |b| b + 1);
                let Some(entry) = self.history_entry(back).copied() else {
                    return;
                };
                if self.browse.is_none() {
                    self.draft.copy_from(&self.line);
                }
                self.browse = Some(back);
                self.show(&entry, echo);
            }
            Key::Down => match self.browse {
                None => {}
                Some(0) => {
                    self.browse = None;
                    let draft = *self.draft;
                    self.show(&draft, echo);
                }
                Some(back) => {
                    if let Some(entry) = self.history_entry(back - 1).copied() {
                        self.browse = Some(back - 1);
                        self.show(&entry, echo);
                    }
                }
            },
        }
    }

    /// Replaces the input with `line`, cursor at its end, and redraws.
    fn show(&mut self, line: &LineBuf, echo: &mut Vec<u8>) {
        self.line.copy_from(line);
        self.cursor = self.line.len;
        self.redraw(echo);
    }
}

fn is_printable(byte: u8) -> bool {
    (0x20..=0x7e).contains(&byte)
}

/// The key a CSI sequence (`ESC [ params final`) stands for, if any.
fn csi_key(final_byte: u8, params: &[u8]) -> Option<Key> {
    match final_byte {
        b'~' => {
            let first = params.split(|b| *b == b';').next().unwrap_or(&[]);
            match first {
                b"1" | b"7" => Some(Key::Home),
                b"4" | b"8" => Some(Key::End),
                b"3" => Some(Key::Delete),
                _ => None,
            }
        }
        other => ss3_key(other),
    }
}

/// The key an SS3 sequence (`ESC O final`), or a CSI final byte, stands for, if any.
fn ss3_key(final_byte: u8) -> Option<Key> {
    match final_byte {
        b'A' => Some(Key::Up),
        b'B' => Some(Key::Down),
        b'C' => Some(Key::Right),
        b'D' => Some(Key::Left),
        b'H' => Some(Key::Home),
        b'F' => Some(Key::End),
        _ => None,
    }
}

/// The cursor `n` columns left: nothing for 0, Backspace for 1, else `ESC [ n D`.
fn move_left(n: usize, out: &mut Vec<u8>) {
    match n {
        0 => return,
        1 => return out.push(0x08),
        _ => {}
    }
    out.extend_from_slice(b"\x1b[");
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    let mut rest = n;
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
    out.push(b'D');
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROMPT: &str = "nas-a(primary)> ";

    fn editor() -> LineEditor {
        LineEditor::new(PROMPT.to_string())
    }

    /// Feeds `bytes`; returns the events and the echo as text.
    fn type_in(editor: &mut LineEditor, bytes: &[u8]) -> (Vec<LineEvent>, String) {
        let mut echo = Vec::new();
        let events = editor.feed(bytes, &mut echo);
        (events, String::from_utf8_lossy(&echo).into_owned())
    }

    fn line(text: &str) -> LineEvent {
        LineEvent::Line(text.to_string())
    }

    /// A small deterministic generator (xorshift64*), so the noise test needs no crate.
    struct Noise(u64);

    impl Noise {
        fn next_byte(&mut self) -> u8 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        }
    }

    #[test]
    fn typed_text_is_echoed_and_enter_completes_the_line() {
        let mut editor = editor();
        let (events, echo) = type_in(&mut editor, b"status");
        assert!(events.is_empty());
        assert_eq!(echo, "status");
        assert_eq!(editor.input(), "status");
        let (events, echo) = type_in(&mut editor, b"\r");
        assert_eq!(events, vec![line("status")]);
        assert_eq!(echo, format!("\r\n{PROMPT}"));
        assert_eq!(editor.input(), "");
    }

    #[test]
    fn cr_lf_counts_once_and_lone_lf_completes_a_line() {
        let mut editor = editor();
        let (events, _) = type_in(&mut editor, b"help\r\nevents\nverify\r");
        assert_eq!(events, vec![line("help"), line("events"), line("verify")]);
        // \r and \n split over two feeds are still one Enter.
        let (events, _) = type_in(&mut editor, b"status\r");
        assert_eq!(events, vec![line("status")]);
        let (events, echo) = type_in(&mut editor, b"\n");
        assert!(events.is_empty());
        assert_eq!(echo, "");
    }

    #[test]
    fn enter_on_a_blank_line_shows_a_new_prompt_and_yields_nothing() {
        let mut editor = editor();
        let (events, echo) = type_in(&mut editor, b"   \r");
        assert!(events.is_empty());
        assert_eq!(echo, format!("   \r\n{PROMPT}"));
    }

    #[test]
    fn enter_on_a_blank_line_yields_an_empty_line_when_asked_and_skips_the_history() {
        let mut editor = editor();
        editor.set_blank_lines(true);
        let (events, echo) = type_in(&mut editor, b"status\r  \r\r\n");
        assert_eq!(events, vec![line("status"), line(""), line("")]);
        assert!(
            echo.ends_with(&format!("  \r\n{PROMPT}\r\n{PROMPT}")),
            "{echo:?}"
        );
        // Up recalls the last line that was not blank.
        type_in(&mut editor, b"\x1b[A");
        assert_eq!(editor.input(), "status");
    }

    #[test]
    fn backspace_deletes_before_the_cursor_with_either_code() {
        let mut editor = editor();
        let (_, echo) = type_in(&mut editor, b"statx\x7f");
        assert_eq!(echo, "statx\x08 \x08");
        let (events, _) = type_in(&mut editor, b"uq\x08s\r");
        assert_eq!(events, vec![line("status")]);
        // Backspace on an empty line does nothing.
        let (events, echo) = type_in(&mut editor, b"\x7f\x08");
        assert!(events.is_empty());
        assert_eq!(echo, "");
    }

    #[test]
    fn arrows_move_the_cursor_and_typing_inserts_in_the_middle() {
        let mut editor = editor();
        let (_, echo) = type_in(&mut editor, b"stus\x1b[D\x1b[D");
        assert_eq!(echo, "stus\x08\x08");
        assert_eq!(editor.cursor(), 2);
        let (_, echo) = type_in(&mut editor, b"a");
        // The byte, the rest of the line, and the cursor back to after the byte.
        assert_eq!(echo, "aus\x1b[2D");
        let (_, echo) = type_in(&mut editor, b"\x1b[D\x1bOCt");
        assert_eq!(echo, "\x08atus\x1b[2D");
        let (_, echo) = type_in(&mut editor, b"\x1b[C\x1b[C\x1b[C");
        assert_eq!(echo, "us");
        assert_eq!(editor.cursor(), 6);
        assert_eq!(editor.input(), "status");
        let (events, _) = type_in(&mut editor, b"\r");
        assert_eq!(events, vec![line("status")]);
    }

    #[test]
    fn backspace_and_delete_in_the_middle_redraw_the_rest_of_the_line() {
        let mut editor = editor();
        type_in(&mut editor, b"staXtus\x1b[D\x1b[D\x1b[D");
        let (_, echo) = type_in(&mut editor, b"\x7f");
        assert_eq!(echo, "\x08tus \x1b[4D");
        assert_eq!(editor.input(), "status");
        type_in(&mut editor, b"Y\x1b[D");
        let (_, echo) = type_in(&mut editor, b"\x1b[3~");
        assert_eq!(echo, "tus \x1b[4D");
        assert_eq!(editor.input(), "status");
    }

    #[test]
    fn home_and_end_keys_jump_to_the_ends_of_the_line() {
        let mut editor = editor();
        type_in(&mut editor, b"tatus\x1b[H");
        assert_eq!(editor.cursor(), 0);
        type_in(&mut editor, b"s\x1b[F");
        assert_eq!(editor.cursor(), 6);
        type_in(&mut editor, b"\x01\x05\x1b[1~\x1b[4~");
        assert_eq!(editor.cursor(), 6);
        assert_eq!(editor.input(), "status");
    }

    #[test]
    fn ctrl_c_abandons_the_line_and_prints_a_new_prompt() {
        let mut editor = editor();
        let (events, echo) = type_in(&mut editor, b"switchover\x03");
        assert_eq!(events, vec![LineEvent::Cancelled]);
        assert_eq!(echo, format!("switchover^C\r\n{PROMPT}"));
        assert_eq!(editor.input(), "");
        // An abandoned line is not in the history.
        let (events, _) = type_in(&mut editor, b"\x1b[A\r");
        assert!(events.is_empty());
    }

    #[test]
    fn ctrl_u_clears_the_line() {
        let mut editor = editor();
        let (events, echo) = type_in(&mut editor, b"promote --force\x15");
        assert!(events.is_empty());
        assert_eq!(echo, format!("promote --force\r{PROMPT}\x1b[K"));
        let (events, _) = type_in(&mut editor, b"status\r");
        assert_eq!(events, vec![line("status")]);
    }

    #[test]
    fn history_walks_back_and_forth_and_returns_to_the_draft() {
        let mut editor = editor();
        type_in(&mut editor, b"status\rhelp\r");
        type_in(&mut editor, b"ver");
        let (_, echo) = type_in(&mut editor, b"\x1b[A");
        assert_eq!(echo, format!("\r{PROMPT}help\x1b[K"));
        type_in(&mut editor, b"\x1b[A");
        assert_eq!(editor.input(), "status");
        // Past the oldest entry, Up stays put.
        type_in(&mut editor, b"\x1b[A");
        assert_eq!(editor.input(), "status");
        type_in(&mut editor, b"\x1b[B");
        assert_eq!(editor.input(), "help");
        let (_, echo) = type_in(&mut editor, b"\x1b[B");
        assert_eq!(editor.input(), "ver");
        assert_eq!(echo, format!("\r{PROMPT}ver\x1b[K"));
        // Below the draft, Down does nothing.
        let (_, echo) = type_in(&mut editor, b"\x1b[B");
        assert_eq!(echo, "");
        // A recalled line can be run again, and SS3 arrows work too.
        type_in(&mut editor, b"\x15\x1bOA\x1bOA");
        let (events, _) = type_in(&mut editor, b"\r");
        assert_eq!(events, vec![line("status")]);
    }

    #[test]
    fn history_skips_blank_lines_and_consecutive_duplicates() {
        let mut editor = editor();
        type_in(&mut editor, b"status\r\r  \rstatus\rstatus\rhelp\rstatus\r");
        let mut recalled = Vec::new();
        for _ in 0..5 {
            type_in(&mut editor, b"\x1b[A");
            recalled.push(editor.input().to_string());
        }
        assert_eq!(recalled, ["status", "help", "status", "status", "status"]);
    }

    #[test]
    fn history_keeps_only_the_newest_entries() {
        let mut editor = editor();
        for i in 0..CONSOLE_HISTORY_COUNT_MAX + 8 {
            type_in(&mut editor, format!("line{i}\r").as_bytes());
        }
        for _ in 0..CONSOLE_HISTORY_COUNT_MAX + 8 {
            type_in(&mut editor, b"\x1b[A");
        }
        assert_eq!(editor.input(), "line8");
    }

    #[test]
    fn escape_sequences_split_across_feeds_still_work() {
        let mut editor = editor();
        type_in(&mut editor, b"status\rab");
        for piece in [&b"\x1b"[..], b"[", b"D"] {
            type_in(&mut editor, piece);
        }
        assert_eq!(editor.cursor(), 1);
        for piece in [&b"\x1b"[..], b"[3", b"~"] {
            type_in(&mut editor, piece);
        }
        assert_eq!(editor.input(), "a");
        type_in(&mut editor, b"\x1b");
        type_in(&mut editor, b"O");
        type_in(&mut editor, b"A");
        assert_eq!(editor.input(), "status");
    }

    #[test]
    fn unknown_and_broken_escape_sequences_are_ignored() {
        let mut editor = editor();
        // Shift-Tab, F5, Alt-x, a sequence cut by Enter, and one far too long.
        let (events, _) = type_in(&mut editor, b"st\x1b[Z\x1b[15~\x1bxa\x1b[1;5");
        assert!(events.is_empty());
        assert_eq!(editor.input(), "sta");
        let (events, _) = type_in(&mut editor, b"\r");
        assert_eq!(events, vec![line("sta")]);
        let (events, _) = type_in(
            &mut editor,
            b"\x1b[123456789012345678901234\x1bOQ\x1b\x1b[D",
        );
        assert!(events.is_empty());
        // The overlong parameters end the sequence; what follows is ordinary text.
        assert_eq!(editor.input(), "012345678901234");
        assert_eq!(editor.cursor(), editor.input().len() - 1);
    }

    #[test]
    fn control_bytes_and_non_ascii_bytes_are_ignored() {
        let mut editor = editor();
        let (events, echo) = type_in(
            &mut editor,
            "st\0\x02\x7fat\u{e9}us\x09\x04\u{2603}\r".as_bytes(),
        );
        assert_eq!(events, vec![line("satus")]);
        assert!(!echo.contains('\u{e9}'));
        let (events, _) = type_in(&mut editor, b"\xff\xfe\x9b\x80status\r");
        assert_eq!(events, vec![line("status")]);
    }

    #[test]
    fn a_full_line_refuses_more_bytes_with_a_bell() {
        let mut editor = editor();
        let long = vec![b'x'; CONSOLE_LINE_BYTES_MAX];
        let (_, echo) = type_in(&mut editor, &long);
        assert_eq!(echo.len(), CONSOLE_LINE_BYTES_MAX);
        let (_, echo) = type_in(&mut editor, b"yz\x1b[Dq");
        assert_eq!(echo, "\x07\x07\x08\x07");
        assert_eq!(editor.input().len(), CONSOLE_LINE_BYTES_MAX);
        // Room again after a backspace.
        type_in(&mut editor, b"\x7fw");
        let mut expected = "x".repeat(CONSOLE_LINE_BYTES_MAX - 2);
        expected.push('w');
        expected.push('x');
        let (events, _) = type_in(&mut editor, b"\r");
        assert_eq!(events, vec![LineEvent::Line(expected)]);
    }

    #[test]
    fn a_megabyte_of_noise_never_panics_and_leaves_the_editor_usable() {
        let mut editor = editor();
        let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
        let bytes: Vec<u8> = (0..1 << 20).map(|_| noise.next_byte()).collect();
        let mut echo = Vec::new();
        for chunk in bytes.chunks(4096) {
            echo.clear();
            let events = editor.feed(chunk, &mut echo);
            assert!(events.len() <= chunk.len());
            assert!(echo.len() <= chunk.len() * CONSOLE_ECHO_BYTES_PER_INPUT_MAX);
            assert!(editor.input().len() <= CONSOLE_LINE_BYTES_MAX);
            assert!(editor.cursor() <= editor.input().len());
            assert!(editor.input().bytes().all(is_printable));
        }
        // Whatever state the noise left, Ctrl-C starts a clean line.
        let (events, _) = type_in(&mut editor, b"\x03status\r");
        assert_eq!(events, vec![LineEvent::Cancelled, line("status")]);
    }

    #[test]
    fn a_megabyte_line_stays_at_the_limit_and_the_next_line_works() {
        let mut editor = editor();
        let mut echo = Vec::new();
        for _ in 0..256 {
            echo.clear();
            let events = editor.feed(&[b'a'; 4096], &mut echo);
            assert!(events.is_empty());
        }
        let (events, _) = type_in(&mut editor, b"\rstatus\r");
        assert_eq!(events.len(), 2);
        assert_eq!(events[1], line("status"));
    }

    #[test]
    fn print_above_erases_the_input_prints_and_redraws_the_partial_input() {
        let mut editor = editor();
        type_in(&mut editor, b"stat\x1b[D");
        let mut out = Vec::new();
        editor.print_above("peer nas-b lost\nheartbeat link down\n", &mut out);
        assert_eq!(
            String::from_utf8_lossy(&out),
            format!("\r\x1b[Kpeer nas-b lost\r\nheartbeat link down\r\n{PROMPT}stat\x1b[K\x08")
        );
        // The input is untouched: typing goes on where it was.
        let (events, _) = type_in(&mut editor, b"\x05us\r");
        assert_eq!(events, vec![line("status")]);
    }

    #[test]
    fn print_above_shows_control_characters_as_question_marks() {
        let editor = editor();
        let mut out = Vec::new();
        editor.print_above("evil\x1b[2Jname\r\n\u{9b}x\ttab", &mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        assert_eq!(
            text,
            format!("\r\x1b[Kevil?[2Jname\r\n?x\ttab\r\n{PROMPT}\x1b[K")
        );
    }

    #[test]
    fn a_new_prompt_is_sanitised_and_drawn_by_the_next_redraw() {
        let mut editor = editor();
        type_in(&mut editor, b"he");
        editor.set_prompt("nas-a(secondary)\x1b[31m> ".to_string());
        assert_eq!(editor.prompt(), "nas-a(secondary)[31m> ");
        let mut out = Vec::new();
        editor.redraw(&mut out);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "\rnas-a(secondary)[31m> he\x1b[K"
        );
        editor.set_prompt("p".repeat(1000));
        assert_eq!(editor.prompt().len(), CONSOLE_PROMPT_BYTES_MAX);
    }
}
