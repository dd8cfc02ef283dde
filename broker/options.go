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

// cleanupInterval is how often expired tokens, forgotten failures and idle
// breakers are dropped from memory.
const cleanupInterval = time.Minute

// Waits between attempts of one fetch: backoffBase before the second,
// doubled at each next one up to backoffMax. A provider's Retry-After up
// to backoffMax is waited (within the deadline); a longer one ends the
// fetch, and the key's backoff honours it, so no caller sleeps through it.
const (
	backoffBase = 100 * time.Millisecond
	backoffMax  = 2 * time.Second
)

// MaxRetryAfterMemory caps how long a key honours a provider's Retry-After:
// longer values (up to the hour ParseRetryAfter accepts) are cut to this, so
// that a broken or hostile header cannot silence a key for long. It is the
// budgets' cap (budget.MaxHold): one cap for every answer of a provider.
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

// Check returns an error naming the first option of o out of range by its
// setting in the token_broker app: a RefreshWindow (refresh_window) below
// 0 or not below 1, a negative Leeway, FetchTimeout or BudgetWait
// (leeway, fetch_timeout, budget_wait, in that order).
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
	// between 0 and 1, in which its refresh-ahead is planned
	// (Token.RefreshAt): at a random point for a token minted for a
	// caller, so that tokens minted together do not refresh together; at
	// expiry less max(lifetime/40, Leeway+1s) for a token minted by a
	// refresh (earlier when its Profile.Budget has planned that second
	// full). From that point a request is still served the cached token
	// but starts one background refresh. Default 0.25 (the last 25 %).
	// A negative value disables refresh-ahead.
	RefreshWindow float64
	// Leeway is how long a token must still be valid to be handed out: a
	// token closer to its expiry than this counts as expired, so it cannot
	// expire on its way to the provider. Default 1s.
	Leeway time.Duration
	// FetchTimeout bounds one fetch (all its attempts), whoever waits on it.
	// Default 30s.
	FetchTimeout time.Duration
	// MaxAttempts is how many times one fetch calls the Source when it
	// fails with a temporary error (timeout, refused connection, 429, 5xx),
	// waiting an exponential backoff with jitter in between, within the
	// fetch's deadline (see backoffBase). Default 3; 1 disables retries.
	MaxAttempts int
	// FailureTTL is how long the first failed fetch of a key is remembered:
	// until then every fetch of that key, foreground or refresh-ahead, gets
	// the same error without calling the token API. Each further
	// consecutive failure of the key doubles it, up to FailureMax; a
	// provider's Retry-After lengthens it (up to MaxRetryAfterMemory). A
	// success forgets it. Default 2s; negative disables the memory (a
	// failed refresh-ahead still waits DefaultFailureTTL before the next).
	FailureTTL time.Duration
	// FailureMax caps the exponential failure memory of a key. Default 1m.
	FailureMax time.Duration
	// BreakerThreshold is how many consecutive temporary failures
	// (ClassTemporary) of one source open its circuit breaker. 429s do not
	// count (they throttle a client: see ClassRateLimited). Default 5;
	// negative disables.
	BreakerThreshold int
	// BreakerCooldown is how long an open breaker refuses calls before it
	// lets one probe through (half-open). A provider's Retry-After does not
	// lengthen it: it is kept in the failure memory of the key that got it.
	// Default 10s.
	BreakerCooldown time.Duration
	// BudgetWait is the longest a caller waits its turn for its
	// provider's token API budget (Profile.Budget): a caller the queue
	// cannot serve within it (or before its own deadline, less the time
	// the token API call may take) is refused at once with
	// budget.ErrExhausted and the queue's wait as its Retry-After, so a
	// broker answers fast rather than holding callers. Default 5s.
	BudgetWait time.Duration
	// Shared is the optional second cache tier shared by a fleet of
	// brokers. Nil (the default) keeps every token in this process only.
	Shared SharedCache
	// Now is the clock. Default time.Now. Tests inject their own.
	Now func() time.Time
	// Sleep waits between attempts. Default budget.Sleep, a timer. Tests
	// inject their own so that backoff costs no time.
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
	// (never log its Value) or the error, and how long the call took. A
	// call answered ClassRetryNow is told with a *RetryNowError: no
	// failure.
	// background is true for refresh-ahead fetches. A fetch may call the
	// Source several times (Options.MaxAttempts): FetchDone is told
	// once per fetch.
	Fetched(ctx context.Context, b *Binding, tok Token, elapsed time.Duration, background bool, err error)
	// FetchDone is told once per fetch that called the Source, after
	// Fetched was told of its last call and once the outcome is cached
	// (or remembered as a failure). A fetch the failure policy answered
	// without a call (a backoff, an open breaker) is not reported.
	FetchDone(ctx context.Context, b *Binding, f Fetch)
	// BreakerChanged is told when a source's circuit breaker changes
	// state (closed, open, half-open). A change a call's outcome makes is
	// told once that outcome is remembered (a source backoff it starts is
	// already on), before the call's Fetched. A breaker not closed that
	// the policy forgets (Broker.ForgetSource, or an idle source's sweep)
	// is told closed.
	BreakerChanged(sourceID string, state BreakerState)
	// BackingOff is told that b's key starts (on) its backoff (its
	// fetches answer the remembered error without calling the token API)
	// or ends it (a success, or the memory was forgotten). Calls for one
	// key alternate, true then false, and go to the observer of the
	// binding that failed.
	BackingOff(b *Binding, on bool)
	// SourceBackingOff is told that a source starts (on) its backoff (its
	// token API is not called for any key, see Broker.SourceHealth) or
	// ends it.
	SourceBackingOff(sourceID string, on bool)
	// RefreshPlanned is told that the refresh-ahead of b's token, minted
	// by this broker, is planned at at (Token.RefreshAt; an adopted
	// token's was planned where it was minted).
	RefreshPlanned(b *Binding, at time.Time)
	// RefreshBehind is told, once per token, that b's token, ending at
	// expiry, cannot get budget (Profile.Budget) for its refresh before
	// its expiry less Leeway: the key goes cold and its next caller waits
	// for a token. It is told when the budget refuses the refresh with a
	// wait past that point, or, when lookups are sparse, by the first
	// lookup that finds the token past it with its refresh deferred by
	// the budget.
	RefreshBehind(b *Binding, expiry time.Time)
}

// Fetch is a fetch that called the Source, for Observer.FetchDone.
type Fetch struct {
	// Token is the token obtained (never log its Value); zero when Err is
	// set.
	Token Token
	// Err is the fetch's outcome as the failure policy answers it (an
	// open breaker after the last call, or the last call's error, with
	// the backoff applied: RetryAfterOf tells when the token API is
	// called again); nil for a token.
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
	// Err is the call's error; nil when it returned a valid token; a
	// *RetryNowError, which is no failure, when the provider asked for
	// it to be sent again at once (ClassRetryNow).
	Err error
}
