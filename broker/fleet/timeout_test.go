package fleet

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// The bound follows the latency of successful calls (RFC 6298), doubles
// after a timeout until a success, grows with the calls queued ahead, and
// stays between the floor and the ceiling.
func TestCallTimeout(t *testing.T) {
	const floor, ceiling = 50 * time.Millisecond, 2 * time.Second
	ms := func(n int) time.Duration { return time.Duration(n) * time.Millisecond }
	type op struct {
		succeeded time.Duration // a call that took this long succeeded (when > 0)
		timedOut  bool          // a call timed out
		want      time.Duration // the bound of the next call, alone
	}
	tests := []struct {
		name string
		ops  []op
	}{
		{"the floor before any call", []op{{want: floor}}},
		{"fast answers keep the floor", []op{{succeeded: ms(1), want: floor}, {succeeded: ms(2), want: floor}}},
		{"the latency plus four deviations", []op{{succeeded: ms(100), want: ms(300)}, {succeeded: ms(100), want: ms(250)}}},
		{"a slower answer raises it", []op{{succeeded: ms(100), want: ms(300)}, {succeeded: ms(500), want: ms(700)}}},
		{"a timeout doubles it until a success", []op{{timedOut: true, want: ms(100)}, {timedOut: true, want: ms(200)},
			{timedOut: true, want: ms(400)}, {succeeded: ms(10), want: floor}}},
		{"never above the ceiling", []op{{succeeded: ms(1500), want: ceiling}, {timedOut: true, want: ceiling}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ct := newCallTimeout(floor, ceiling, 10)
			for i, o := range tt.ops {
				c := ct.start()
				switch {
				case o.succeeded > 0:
					ct.succeeded(o.succeeded)
				case o.timedOut:
					ct.timedOut(c)
				default:
					ct.ended()
				}
				next := ct.start()
				ct.ended()
				if next.bound != o.want {
					t.Fatalf("op %d: bound %s, want %s", i, next.bound, o.want)
				}
			}
		})
	}
}

// A call behind full pools of calls gets one bound more per pool ahead.
func TestCallTimeoutQueue(t *testing.T) {
	ct := newCallTimeout(50*time.Millisecond, time.Second, 10)
	var bounds []time.Duration
	for range 35 {
		bounds = append(bounds, ct.start().bound)
	}
	for i, want := range map[int]time.Duration{0: 50 * time.Millisecond, 9: 50 * time.Millisecond, 10: 100 * time.Millisecond,
		25: 150 * time.Millisecond, 34: 200 * time.Millisecond} {
		if bounds[i] != want {
			t.Errorf("call %d: bound %s, want %s", i, bounds[i], want)
		}
	}
	for range 35 {
		ct.ended()
	}
	if got := ct.start().bound; got != 50*time.Millisecond {
		t.Fatalf("bound after the queue drained: %s", got)
	}
	ct = newCallTimeout(50*time.Millisecond, 120*time.Millisecond, 1)
	for range 5 {
		ct.start()
	}
	if got := ct.start().bound; got != 120*time.Millisecond {
		t.Fatalf("a long queue's bound %s; want the ceiling", got)
	}
}

// Unreachable Redis fails; a call that ran out of its bound is slow.
func TestIsSlow(t *testing.T) {
	dial := func(err error) error { return &net.OpError{Op: "dial", Net: "tcp", Err: err} }
	read := func(err error) error { return &net.OpError{Op: "read", Net: "tcp", Err: err} }
	tests := []struct {
		err  error
		slow bool
	}{
		{dial(&os.SyscallError{Syscall: "connect", Err: syscall.ECONNREFUSED}), false},
		{dial(&os.SyscallError{Syscall: "connect", Err: syscall.EHOSTUNREACH}), false},
		{dial(os.ErrDeadlineExceeded), false},
		{read(&os.SyscallError{Syscall: "read", Err: syscall.ECONNRESET}), false},
		{io.EOF, false},
		{redis.ErrClosed, false},
		{errors.New("LOADING Redis is loading the dataset in memory"), false},
		{read(os.ErrDeadlineExceeded), true},
		{context.DeadlineExceeded, true},
		{fmt.Errorf("get: %w", context.DeadlineExceeded), true},
		{redis.ErrPoolTimeout, true},
	}
	for _, tt := range tests {
		if got := isSlow(tt.err); got != tt.slow {
			t.Errorf("isSlow(%v) = %v, want %v", tt.err, got, tt.slow)
		}
	}
}
