package budget

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"sync"
	"time"
)

// Store spends a generic cell rate algorithm (GCRA) bucket per key: shared
// by a fleet (redis_rate, whose AllowN this mirrors) or in this process
// (NewLocal). The bucket keeps only its theoretical arrival time, so calls
// for one key may pass different Limits (a smaller Burst keeps a reserve).
// A key can be closed (Hold) for every budget spending it. Safe for
// concurrent use.
type Store interface {
	// AllowN spends n requests of key's bucket under l if it holds them,
	// all or nothing. n = 0 spends nothing and reports Remaining. While
	// key is held (Hold) it spends nothing: Allowed and Remaining are 0,
	// RetryAfter and ResetAfter what is left of the hold.
	AllowN(ctx context.Context, key string, l Limit, n int) (Result, error)
	// Hold closes key for d from now, on the store's clock: AllowN
	// refuses until then. It never shortens a hold in force; d <= 0
	// holds nothing. The caller caps d (MaxHold).
	Hold(ctx context.Context, key string, d time.Duration) error
}

// Result is a Store's answer, field for field redis_rate's Result.
type Result struct {
	// Allowed is n when the requests were spent, 0 when they were not.
	Allowed int
	// Remaining is how many more requests the bucket holds now.
	Remaining int
	// RetryAfter is, when Allowed is 0, how long until n requests fit;
	// negative or 0 when they were spent.
	RetryAfter time.Duration
	// ResetAfter is how long until the bucket is full again.
	ResetAfter time.Duration
}

// local is the in-process Store.
type local struct {
	now func() time.Time

	mu     sync.Mutex
	tat    map[string]time.Time // theoretical arrival time per key (one per budget)
	closed map[string]time.Time // end of a hold per key (Hold)
}

// NewLocal returns an in-process Store on the clock now (time.Now when
// nil) that computes what redis_rate computes. It never fails.
func NewLocal(now func() time.Time) Store {
	if now == nil {
		now = time.Now
	}
	return &local{now: now, tat: map[string]time.Time{}, closed: map[string]time.Time{}}
}

// Hold implements Store.
func (s *local) Hold(_ context.Context, key string, d time.Duration) error {
	if d <= 0 {
		return nil
	}
	until := s.now().Add(d)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed[key] = later(s.closed[key], until)
	return nil
}

// AllowN implements Store.
func (s *local) AllowN(_ context.Context, key string, l Limit, n int) (Result, error) {
	if err := l.Validate(); err != nil {
		return Result{}, err
	}
	ei := l.interval()
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	tat := s.tat[key]
	if tat.Before(now) {
		tat = now
	}
	if until, ok := s.closed[key]; ok {
		if now.Before(until) {
			return Result{RetryAfter: until.Sub(now), ResetAfter: until.Sub(now)}, nil
		}
		delete(s.closed, key)
	}
	newTat := tat.Add(ei * time.Duration(n))
	diff := now.Sub(newTat.Add(-ei * time.Duration(l.Burst)))
	if diff < 0 {
		return Result{RetryAfter: -diff, ResetAfter: tat.Sub(now)}, nil
	}
	if n > 0 {
		s.tat[key] = newTat
	}
	return Result{Allowed: n, Remaining: int(diff / ei), RetryAfter: -1, ResetAfter: newTat.Sub(now)}, nil
}

// accountLabel separates Account's hashes from any other hash of the same
// value.
const accountLabel = "token broker budget account\x00"

// Account returns the fingerprint of the account a provider counts token
// requests against, from the credential that names it (a client_id, an
// API key): 16 hex characters of a labelled SHA-256, the same in every
// process; "" for none. It keeps the credential out of a budget's key but
// lets whoever holds it confirm a guessed credential.
func Account(credential string) string {
	if credential == "" {
		return ""
	}
	sum := sha256.Sum256([]byte(accountLabel + credential))
	return hex.EncodeToString(sum[:8])
}
