// Package eventlog is a Caddy events handler for tests: it appends each
// event it is given to a file, one JSON object a line. Caddy's standard
// modules have no events handler; this one lets the integration tests
// subscribe to events in a real Caddy (integration/eventcaddy) and read
// what arrived. It is not part of the product's Caddy.
package eventlog

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
)

func init() {
	caddy.RegisterModule(new(Log))
}

// Log is the events handler events.handlers.token_broker_test_log. In a
// Caddyfile:
//
//	events {
//	    on <event> token_broker_test_log <file>
//	}
type Log struct {
	// File is the path of the file the events are appended to; it is
	// created if missing.
	File string `json:"file,omitempty"`

	mu sync.Mutex
}

// Line is one event in the file.
type Line struct {
	// Name is the event's name.
	Name string `json:"name"`
	// Origin is the ID of the module that emitted it, "" for Caddy's core.
	Origin string `json:"origin"`
	// Time is when it was emitted.
	Time time.Time `json:"time"`
	// Data is the event's data.
	Data map[string]any `json:"data"`
}

// CaddyModule returns the Caddy module information.
func (*Log) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "events.handlers.token_broker_test_log",
		New: func() caddy.Module { return new(Log) },
	}
}

// Validate requires the file.
func (l *Log) Validate() error {
	if l.File == "" {
		return errors.New("token_broker_test_log: file is required")
	}
	return nil
}

// Handle appends e to the file.
func (l *Log) Handle(_ context.Context, e caddy.Event) error {
	line := Line{Name: e.Name(), Time: e.Timestamp(), Data: e.Data}
	if o := e.Origin(); o != nil {
		line.Origin = string(o.CaddyModule().ID)
	}
	b, err := json.Marshal(line)
	if err != nil {
		return fmt.Errorf("token_broker_test_log: event %s: %w", e.Name(), err)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	f, err := os.OpenFile(l.File, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("token_broker_test_log: %w", err)
	}
	if _, err := f.Write(append(b, '\n')); err != nil {
		f.Close()
		return fmt.Errorf("token_broker_test_log: %w", err)
	}
	return f.Close()
}

// UnmarshalCaddyfile reads `token_broker_test_log <file>`.
func (l *Log) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the handler's name
	if !d.NextArg() {
		return d.ArgErr()
	}
	l.File = d.Val()
	if d.NextArg() {
		return d.ArgErr()
	}
	return nil
}

// Interface guards.
var (
	_ caddyevents.Handler   = (*Log)(nil)
	_ caddy.Validator       = (*Log)(nil)
	_ caddyfile.Unmarshaler = (*Log)(nil)
)
