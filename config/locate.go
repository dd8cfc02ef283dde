package config

import (
	"bytes"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"
)

// problem records a problem with key, a TOML key whose first two parts
// name the entry ([providers.NAME], [merchants.ID]) and the rest the
// field, at the key's line.
func (p *parser) problem(key []string, msg string) {
	entry, field := entryField(key)
	p.errs = append(p.errs, &Error{File: p.file, Line: p.line(key...), Entry: entry, Field: field, Msg: msg})
}

// entryField splits a key into the entry it belongs to and the field
// within it.
func entryField(k toml.Key) (entry, field string) {
	if len(k) >= 2 && (k[0] == "providers" || k[0] == "merchants") {
		return fmt.Sprintf("%s %q", strings.TrimSuffix(k[0], "s"), k[1]), k[2:].String()
	}
	return "", k.String()
}

// typeErrorRe matches BurntSushi's type errors, which are not ParseErrors.
var typeErrorRe = regexp.MustCompile(`(?s)^toml: line (\d+) \(last key "((?:[^"\\]|\\.)*)"\): (.*)$`)

// duplicateRe matches BurntSushi's syntax error for a key or table defined
// twice, which quotes the key only, never a value.
var duplicateRe = regexp.MustCompile(`^Key '(.*)' has already been defined\.$`)

// decodeError records an error of BurntSushi's decoder: a syntax error
// (syntax, from toml.Decode) or a value of the wrong type (from an
// entry's PrimitiveDecode). Both carry the line. The last key names the
// field at fault only for the latter: a syntax error's last key may be
// the previous line's.
func (p *parser) decodeError(err error, syntax bool) {
	e := &Error{File: p.file, Msg: strings.TrimPrefix(err.Error(), "toml: ")}
	var key string
	var pe toml.ParseError
	if errors.As(err, &pe) {
		e.Line, e.Msg, key = pe.Position.Line, pe.Message, pe.LastKey
		// Counted from where it stumbled (the last byte of the text it
		// read, in the file as BurntSushi read it: without a byte-order
		// mark), as BurntSushi puts a newline it stumbled on on the next
		// line.
		if at := bomLen(p.data) + pe.Position.Start + max(pe.Position.Len-1, 0); syntax && pe.Position.Start >= 0 && at < len(p.data) {
			e.Line = 1 + bytes.Count(p.data[:at], []byte{'\n'})
		}
	} else if m := typeErrorRe.FindStringSubmatch(err.Error()); m != nil {
		fmt.Sscan(m[1], &e.Line)
		key, e.Msg = unquote(`"`+m[2]+`"`), m[3]
	}
	e.Line = p.fileLine(e.Line)
	if m := duplicateRe.FindStringSubmatch(e.Msg); syntax && m != nil {
		// Named by the key defined twice, a secret's included.
		key, syntax = m[1], false
		e.Msg = "defined a second time here: keep one of its definitions"
	}
	switch k := splitKey(key); {
	case syntax && len(k) > 0 && slices.Contains(secretKeys, k[len(k)-1]):
		// The parser quotes the text it stumbled on: here, a secret.
		e.Msg = fmt.Sprintf("the value of %s is not valid TOML (details withheld, they could quote the secret): write a quoted reference such as \"{env.NAME}\"", key)
	case syntax && key != "":
		e.Msg += fmt.Sprintf(" (after key %q)", key)
	case !syntax:
		e.Entry, e.Field = entryField(k)
	}
	p.errs = append(p.errs, e)
}

// line returns the line of a key in the file (see locator.line), locating
// every key of the text on the first call.
func (p *parser) line(key ...string) int {
	if p.loc == nil {
		p.loc = locate(p.data)
	}
	return p.fileLine(p.loc.line(key...))
}

// fileLine returns the line in the file of a line of the text parsed; 0
// (unknown) stays 0.
func (p *parser) fileLine(line int) int {
	if line == 0 {
		return 0
	}
	return line + p.offset
}

// locator maps keys (joined with NUL) to the line where the file first
// defines them. BurntSushi/toml keeps key positions private, so the raw file
// is scanned for table headers ([merchants.acme], [merchants."a b"]) and
// for key definitions (acme = {...}, acme.provider = "x", provider = "x")
// under the current table. It serves messages and the entries' Line: a
// key it misses has line 0.
type locator map[string]int

// locate returns the locator of every key of data.
func locate(data []byte) locator {
	loc := locator{}
	var table []string
	var inString string // the closing delimiter of an open multi-line string
	text := string(data)
	for n := 0; text != ""; n++ {
		line := text
		if i := strings.IndexByte(text, '\n'); i >= 0 {
			line, text = text[:i], text[i+1:]
		} else {
			text = ""
		}
		line = strings.TrimSpace(line)
		if inString != "" {
			if strings.Count(line, inString)%2 == 1 {
				inString = ""
			}
			continue
		}
		if strings.HasPrefix(line, "[") {
			key, rest, ok := parseKey(strings.TrimPrefix(line[1:], "["))
			if ok && strings.HasPrefix(rest, "]") {
				table = key
				for i := 1; i <= len(key); i++ {
					loc.set(key[:i], n+1)
				}
			}
			continue
		}
		key, rest, ok := parseKey(line)
		if !ok || !strings.HasPrefix(rest, "=") {
			continue
		}
		full := append(table[:len(table):len(table)], key...)
		for i := len(table) + 1; i <= len(full); i++ {
			loc.set(full[:i], n+1)
		}
		for _, d := range []string{`"""`, `'''`} {
			if strings.Count(rest, d)%2 == 1 {
				inString = d
				break
			}
		}
	}
	return loc
}

func (l locator) set(key []string, line int) {
	k := strings.Join(key, "\x00")
	if _, ok := l[k]; !ok {
		l[k] = line
	}
}

// line returns the line of key or, failing that, of its closest ancestor
// down to the entry (the first two parts); 0 when none is found.
func (l locator) line(key ...string) int {
	for n := len(key); n > 0 && (n >= 2 || len(key) == 1); n-- {
		if line, ok := l[strings.Join(key[:n], "\x00")]; ok {
			return line
		}
	}
	return 0
}

// parseKey reads a dotted TOML key (bare, "basic" or 'literal' parts) at
// the start of s and returns its parts and what follows, left-trimmed.
func parseKey(s string) (key []string, rest string, ok bool) {
	for {
		s = strings.TrimLeft(s, " \t")
		var part string
		switch {
		case s == "":
			return nil, "", false
		case s[0] == '"':
			i := 1
			for i < len(s) && s[i] != '"' {
				if s[i] == '\\' {
					i++
				}
				i++
			}
			if i >= len(s) {
				return nil, "", false
			}
			part, s = unquote(s[:i+1]), s[i+1:]
		case s[0] == '\'':
			i := strings.IndexByte(s[1:], '\'')
			if i < 0 {
				return nil, "", false
			}
			part, s = s[1:i+1], s[i+2:]
		default:
			i := 0
			for i < len(s) && isBareKeyChar(s[i]) {
				i++
			}
			if i == 0 {
				return nil, "", false
			}
			part, s = s[:i], s[i:]
		}
		key = append(key, part)
		s = strings.TrimLeft(s, " \t")
		if !strings.HasPrefix(s, ".") {
			return key, s, true
		}
		s = s[1:]
	}
}

// unquote decodes a TOML basic string; TOML's escapes are Go's, near
// enough for finding lines.
func unquote(q string) string {
	if s, err := strconv.Unquote(q); err == nil {
		return s
	}
	return q[1 : len(q)-1]
}

func isBareKeyChar(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '-'
}

// splitKey parses a key as BurntSushi prints it (toml.Key.String), e.g. the
// LastKey of a ParseError.
func splitKey(s string) []string {
	key, rest, ok := parseKey(s)
	if !ok || rest != "" {
		return nil
	}
	return key
}

// bomLen is the length of the byte-order mark data starts with, which
// BurntSushi's decoder drops before it reads (UTF-8, or UTF-16 of either
// order); 0 without one.
func bomLen(data []byte) int {
	switch {
	case bytes.HasPrefix(data, []byte("\xef\xbb\xbf")):
		return 3
	case bytes.HasPrefix(data, []byte("\xff\xfe")), bytes.HasPrefix(data, []byte("\xfe\xff")):
		return 2
	}
	return 0
}
