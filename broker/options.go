package broker

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/budget"
)

// Defaults of Options.
const (
	DefaultRefreshWindow    = 0.25
	DefaultLeeway           = time.Second
	DefaultFetchTimeout     = 30 * time.Second
	DefaultMaxAttempts      = 3
	DefaultFailureTTL       = 2 * time.Second
	DefaultFailureMax       = time.Minute
	DefaultBreakerThreshold = 5
	DefaultBreakerCooldown  = 10 * time.Second
	DefaultBudgetWait       = 5 * time.Second
)

// cleanupInterval is how often expired tokens and ended policy state are
// dropped from memory.
const cleanupInterval = time.Minute

// Waits between attempts of one fetch: backoffBase before the second,
// doubled up to backoffMax. A longer Retry-After ends the fetch.
const (
	backoffBase = 100 * time.Millisecond
	backoffMax  = 2 * time.Second
)

// MaxRetryAfterMemory caps how long the failure policy honours a
// provider's Retry-After: budget.MaxHold, one cap for every answer.
const MaxRetryAfterMemory = budget.MaxHold

// ParseFraction reads a fraction strictly between 0 and 1 written as
// "0.25" or "25%" (a RefreshWindow in a config).
func ParseFraction(v string) (float64, error) {
	pct, isPct := strings.CutSuffix(v, "%")
	f, err := strconv.ParseFloat(pct, 64)
	if err != nil {
		return 0, err
	}
	if isPct {
		f /= 100
	}
	if f <= 0 || f >= 1 {
		return 0, strconv.ErrRange
	}
	return f, nil
}

// Check returns an error naming, by its token_broker setting, the first
// option of o out of range: refresh_window outside [0, 1), or a negative
// leeway, fetch_timeout or budget_wait.
func (o Options) Check() error {
	if o.RefreshWindow < 0 || o.RefreshWindow >= 1 {
		return fmt.Errorf("refresh_window %g must be at least 0 and below 1", o.RefreshWindow)
	}
	durations := []time.Duration{o.Leeway, o.FetchTimeout, o.BudgetWait} // the first negative one is named
	for i, name := range []string{"leeway", "fetch_timeout", "budget_wait"} {
		if durations[i] < 0 {
			return fmt.Errorf("%s %s must not be negative: leave it out for the default", name, durations[i])
		}
	}
	return nil
}

// Options configure a Broker. The zero value gives the defaults.
type Options struct {
	// RefreshWindow is the last part of a token's lifetime, as a fraction
	// between 0 and 1, in which its refresh-ahead is planned (see
	// planRefresh). From that point a request is still served the cached
	// token but starts one background refresh. Default 0.25; negative
	// disables refresh-ahead.
	RefreshWindow float64
	// Leeway is how long a token must still be valid to be handed out, so
	// that it cannot expire on its way. Default 1s.
	Leeway time.Duration
	// FetchTimeout bounds one fetch (all its attempts), whoever waits on it.
	// Default 30s.
	FetchTimeout time.Duration
	// MaxAttempts is how many times one fetch calls the Source while it
	// fails with a temporary error, with jittered exponential backoff in
	// between. Default 3; 1 disables retries.
	MaxAttempts int
	// FailureTTL is how long the first failed fetch of a key is remembered:
	// until then every fetch of the key gets the same error without calling
	// the token API. Each consecutive failure doubles it up to FailureMax;
	// a provider's Retry-After lengthens it (up to MaxRetryAfterMemory). A
	// success forgets it. Default 2s; negative disables the memory (a
	// failed refresh-ahead still waits DefaultFailureTTL before the next).
	FailureTTL time.Duration
	// FailureMax caps the exponential failure memory of a key. Default 1m.
	FailureMax time.Duration
	// BreakerThreshold is how many consecutive ClassTemporary failures of
	// one source open its circuit breaker. Default 5; negative disables.
	BreakerThreshold int
	// BreakerCooldown is how long an open breaker refuses calls before it
	// lets one probe through (half-open). Default 10s.
	BreakerCooldown time.Duration
	// BudgetWait is the longest a caller waits its turn for its
	// provider's budget (Profile.Budget): a caller the queue cannot serve
	// within it, or before its deadline less the call's bound, is refused
	// at once with budget.ErrExhausted and the queue's wait. Default 5s.
	BudgetWait time.Duration
	// Shared is the optional second cache tier shared by a fleet of
	// brokers. Nil (the default) keeps every token in this process only.
	Shared SharedCache
	// Now is the clock. Default time.Now. Tests inject their own.
	Now func() time.Time
	// Sleep waits between attempts and for budget. Default budget.Sleep.
	Sleep func(ctx context.Context, d time.Duration) error
}

// withDefaults returns the options with every zero value replaced by its
// default.
func (o Options) withDefaults() Options {
	if o.RefreshWindow == 0 {
		o.RefreshWindow = DefaultRefreshWindow
	}
	if o.RefreshWindow > 1 {
		o.RefreshWindow = 1
	}
	if o.Leeway == 0 {
		o.Leeway = DefaultLeeway
	}
	if o.FetchTimeout == 0 {
		o.FetchTimeout = DefaultFetchTimeout
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.MaxAttempts <= 0 {
		o.MaxAttempts = DefaultMaxAttempts
	}
	if o.FailureTTL == 0 {
		o.FailureTTL = DefaultFailureTTL
	}
	if o.FailureMax <= 0 {
		o.FailureMax = DefaultFailureMax
	}
	if o.BreakerThreshold == 0 {
		o.BreakerThreshold = DefaultBreakerThreshold
	}
	if o.BreakerCooldown <= 0 {
		o.BreakerCooldown = DefaultBreakerCooldown
	}
	if o.BudgetWait <= 0 {
		o.BudgetWait = DefaultBudgetWait
	}
	if o.Sleep == nil {
		o.Sleep = budget.Sleep
	}
	return o
}

// Result says how a lookup was served.
type Result uint8

// Lookup results.
const (
	// Hit: a cached token, not yet at its planned refresh.
	Hit Result = iota
	// RefreshAhead: a cached token past its planned refresh; this lookup
	// started the one background refresh.
	RefreshAhead
	// Miss: no usable token was cached; this lookup waited on a fetch it
	// started, which minted a token.
	Miss
	// Shared: no usable token was cached; this lookup waited on a fetch
	// another lookup had started.
	Shared
	// Adopted: no usable token was cached; this lookup started a fetch
	// that adopted a token from the shared tier (Options.Shared) instead
	// of calling the token API.
	Adopted
)

// String names the result for logs, metrics and placeholders.
func (r Result) String() string {
	switch r {
	case Hit:
		return "hit"
	case RefreshAhead:
		return "refresh"
	case Miss:
		return "miss"
	case Shared:
		return "shared"
	case Adopted:
		return "adopted"
	}
	return "unknown"
}

// Observer is told what the broker does. Implementations must be fast and
// safe for concurrent use; Lookup runs on every request.
type Observer interface {
	// Lookup is called once per successful Get with how it was served.
	Lookup(b *Binding, r Result)
	// Fetched is called after every call to a Source, with the token
	// (never log its Value) or the error (a *RetryNowError for a call
	// answered ClassRetryNow, no failure), and how long the call took.
	// background is true for refresh-ahead fetches.
	Fetched(ctx context.Context, b *Binding, tok Token, elapsed time.Duration, background bool, err error)
	// FetchDone is told once per fetch that called the Source, after
	// the Fetched of its last call, once the outcome is stored.
	FetchDone(ctx context.Context, b *Binding, f Fetch)
	// BreakerChanged is told when a source's circuit breaker changes
	// state, before the Fetched of the call that changed it; a breaker
	// the policy forgets is told closed.
	BreakerChanged(sourceID string, state BreakerState)
	// BackingOff is told that b's key starts (on) or ends its backoff.
	// Calls for one key alternate, true then false, and go to the
	// observer of the binding that failed.
	BackingOff(b *Binding, on bool)
	// SourceBackingOff is told that a source starts (on) or ends its
	// backoff.
	SourceBackingOff(sourceID string, on bool)
	// RefreshPlanned is told that the refresh-ahead of b's token, minted
	// by this broker, is planned at at.
	RefreshPlanned(b *Binding, at time.Time)
	// RefreshBehind is told, once per token, that b's token, ending at
	// expiry, cannot get budget for its refresh before expiry less Leeway:
	// its next caller will wait for a token.
	RefreshBehind(b *Binding, expiry time.Time)
}

// Fetch is a fetch that called the Source, for Observer.FetchDone.
type Fetch struct {
	// Token is the token obtained (never log its Value); zero when Err is
	// set.
	Token Token
	// Err is the fetch's outcome as the failure policy answers it, with
	// the backoff applied (RetryAfterOf); nil for a token.
	Err error
	// Attempts are the calls to the Source, in order; at least one.
	Attempts []Attempt
	// Elapsed runs from the start of the first call to the end of the
	// last, the waits between attempts included.
	Elapsed time.Duration
	// Background is true for a refresh-ahead fetch.
	Background bool

	cutByWait bool // the last call ran out of time after a wait for budget
}

// Attempt is one call to a Source within a fetch.
type Attempt struct {
	// Elapsed is how long the call took.
	Elapsed time.Duration
	// Err is the call's error, nil for a valid token; a *RetryNowError
	// when the provider asked for it to be resent (ClassRetryNow).
	Err error
}
