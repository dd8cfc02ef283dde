// Package fleet is the shared token tier (L2) of a fleet of brokers, on
// Redis: an implementation of broker.SharedCache, and of oauth.Store for
// merchants' refresh tokens.
//
// What it keeps in Redis, under Options.KeyPrefix (default "token_broker:"):
//
//	tok:<name>      a token: its 8-hex fingerprint, then the token (with
//	                the refresh its minting node planned) and its version
//	                sealed (internal/seal, AES-256-GCM); expires with the
//	                token (onClock)
//	lock:<name>     the key's fleet lock (github.com/bsm/redislock): a
//	                lease its live holder renews (lockTTL)
//	rt:<name>       a merchant's refresh token and its version, sealed;
//	                no expiry
//	lock:rt:<name>  a lock that serialises a merchant's refreshes, one
//	                per name key: a refresh takes them all (Store.Lock)
//	starts:<hash>   how many times a consent link was started
//	                (Store.CountStart, startsKey); expires with the link
//	events          the pub/sub channel: "set", "unlock" and "purge"
//	                announcements (a purge carries its cache key and the
//	                purged version sealed)
//	purges          a stream of the last purge announcements (about
//	                1000), read back by a node whose subscription
//	                reconnected, and by a new node
//	probe:<node>    "1", written by the call that probes a Redis that
//	                refused writes; expires after BreakerCooldown
//
// <name> is the HMAC-SHA-256 (hex) of the cache key under a subkey of the
// encryption key, so Redis shows no merchant id, unless Options.PlainKeys
// is set. The cache key is the associated data of each sealed value, so a
// value copied under another name does not open. Versions (version.go)
// make a value older than one a node has seen for its key, or than a
// purge it heard of, unusable: an old sealed value written back is not
// served again.
//
// At start, New tries each command the tier sends once, writing nothing,
// and logs those the Redis ACL user may not run (acl.go).
//
// # A slow Redis is not a dead one
//
// Every Redis call has a bound that follows how fast Redis answers, from
// Options.Timeout to Options.MaxTimeout (timeout.go); a call that can run
// twice with the same effect is tried again with a longer bound (do). A
// lookup's calls before its mint last at most MaxTimeout together, then it
// mints without Redis; the mint itself runs on the caller's context.
//
// One breaker (internal/breaker) keeps Redis out when it is gone: a
// failure to reach Redis or an error answer counts at once, and
// BreakerThreshold of them in a row open it; a timeout counts only once
// timeouts have lasted Options.SlowSpan without a success, so that a burst
// of slow answers on busy CPUs does not open it. While it is open
// (BreakerCooldown) lookups mint without Redis; then one call probes
// Redis. No lookup fails because of Redis.
//
// A Redis that answers reads but refuses writes cannot share tokens. Once
// a call that may write is answered with a write refusal (writeRefusal),
// successful reads neither close the breaker nor reset its count until a
// call certainly writes or the breaker closes, so the refusals open it.
// The probe after the cooldown then first writes probe:<node>: taken, the
// probe's call goes on and closes the breaker; refused, the breaker opens
// again. Other error answers (LOADING, BUSY, MASTERDOWN, WRONGTYPE...) are
// failures of their call only.
package fleet

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math/bits"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/bsm/redislock"
	"github.com/redis/go-redis/v9"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/internal/breaker"
	"github.com/tokenbroker/caddy-token-broker/internal/seal"
	"github.com/tokenbroker/caddy-token-broker/internal/spans"
)

// Defaults of Options.
const (
	// DefaultKeyPrefix starts every Redis key the broker writes.
	DefaultKeyPrefix = "token_broker:"
	// DefaultTimeout is the shortest bound of one Redis call.
	DefaultTimeout = 50 * time.Millisecond
	// DefaultMaxTimeout is the longest bound of one Redis call.
	DefaultMaxTimeout = 2 * time.Second
	// DefaultSlowSpan is how long Redis calls must keep timing out,
	// without one succeeding, before timeouts count towards opening the
	// breaker (at least twice Options.MaxTimeout).
	DefaultSlowSpan = 5 * time.Second
	// LockMargin is how much longer than a fetch timeout a fleet lock's
	// expiry is by default, so that a lock outlives the mint it guards
	// unless the node that took it dies.
	LockMargin = 5 * time.Second
	// DefaultLockTTL is the expiry of a key's fleet lock with the broker's
	// default fetch timeout.
	DefaultLockTTL = broker.DefaultFetchTimeout + LockMargin
	// DefaultLockPoll is how long a node waiting for another's lock trusts
	// the announcement channel before it looks at the lock and the token
	// itself.
	DefaultLockPoll = time.Second
)

// The breaker that keeps Redis out (fixed: no option sets them).
const (
	// BreakerThreshold is how many Redis failures in a row open the
	// breaker (timeouts count once they have lasted Options.SlowSpan).
	BreakerThreshold = 3
	// BreakerCooldown is how long an open breaker keeps Redis out before
	// one call probes it (the others keep out until the probe answers).
	BreakerCooldown = 5 * time.Second
)

// ErrUnavailable is returned (wrapped) by Purge and the refresh token Store
// while the breaker keeps Redis out.
var ErrUnavailable = errors.New("fleet: Redis is unavailable (breaker open after consecutive failures, or timeouts that lasted 5s, or twice timeout_max, without an answer); retrying by itself after the cooldown")

// Options configure a Cache. Client and Keys are required.
type Options struct {
	// Client is the Redis client (single node, cluster or sentinel). The
	// Cache does not close it. Build it with ClientOptions' settings so that
	// a dead Redis fails fast and the client's own timeouts leave the
	// bound of each call to the Cache.
	Client redis.UniversalClient
	// Keys seal what is stored and derive the hashed key names.
	Keys *seal.Keyring
	// KeyPrefix starts every Redis key and the channel name. Default
	// "token_broker:". Brokers that share tokens must use the same prefix
	// (and the same encryption key).
	KeyPrefix string
	// PlainKeys puts cache keys (which contain organisation ids) in Redis
	// key names in clear, for debugging, their bytes that are not
	// printable ASCII escaped as Go does (\x8b: a key starts with a binary
	// tag of its source and scopes). Default false: names are hashed.
	PlainKeys bool
	// Timeout is the shortest bound of a Redis call; the bound grows
	// when Redis answers slower or calls queue for a connection (see the
	// package documentation). Default 50ms.
	Timeout time.Duration
	// MaxTimeout is the longest bound of a Redis call, at least Timeout.
	// A lookup makes a few calls, so keep it well under the broker's
	// fetch timeout. Default 2s (Timeout when Timeout is longer).
	MaxTimeout time.Duration
	// SlowSpan is how long Redis calls must keep timing out, without one
	// succeeding, before each further timeout counts towards opening the
	// breaker. Default 5s, and at least twice MaxTimeout.
	SlowSpan time.Duration
	// LockTTL is the expiry of a refresh token's fleet lock: if its holder
	// dies, the others take over after at most this long (a token's lock
	// is a shorter lease, at most LockTTL: see lockTTL). It must be at
	// least the broker's fetch timeout. A lookup that has waited this long
	// for another node's lock mints without it. Default 35s.
	LockTTL time.Duration
	// LockPoll bounds how long a node waiting for another node's lock
	// waits for the announcement that the token is stored (or the lock
	// released) before it checks the lock and the token itself, and again
	// after each such wait: an announcement lost (a reconnecting
	// subscription, a failed publish) costs at most this. Default 1s.
	LockPoll time.Duration
	// Now is the breaker's clock and the one that computes the stored
	// token's remaining life. Default time.Now.
	Now func() time.Time
	// Logger receives breaker changes, undecryptable values and the
	// first failure of a streak of consent link start counts
	// (Store.CountStart), never a token, a link or a key in clear.
	// Optional.
	Logger *zap.Logger
}

// ClientOptions sets the timeouts of o for a Cache whose Options have
// Timeout timeout and MaxTimeout maxTimeout (zero: their defaults): a dial
// is bounded by timeout (at least 250ms), so a Redis that is not there
// fails fast; reads, writes and the wait for a pool connection by
// maxTimeout, and each call by the deadline the Cache gives it; a dead
// Redis is not retried in a loop. Use it on the options of the client
// given to New.
func ClientOptions(o *redis.UniversalOptions, timeout, maxTimeout time.Duration) {
	timeout, maxTimeout = callBounds(timeout, maxTimeout)
	o.ContextTimeoutEnabled = true
	o.DialTimeout = max(timeout, 250*time.Millisecond)
	o.DialerRetries = 1
	o.ReadTimeout = maxTimeout
	o.WriteTimeout = maxTimeout
	o.PoolTimeout = maxTimeout
	o.MaxRetries = 1
	o.MinRetryBackoff = time.Millisecond
	o.MaxRetryBackoff = 5 * time.Millisecond
}

// callBounds returns the shortest and the longest bound of a Redis call
// given as Options.Timeout and Options.MaxTimeout, with their defaults.
func callBounds(timeout, maxTimeout time.Duration) (time.Duration, time.Duration) {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	if maxTimeout <= 0 {
		maxTimeout = DefaultMaxTimeout
	}
	return timeout, max(maxTimeout, timeout)
}

// Cache is the Redis shared tier. Create it with New; Close it when done.
// It is safe for concurrent use.
type Cache struct {
	opts     Options
	nameKeys [][]byte // name keys, current first (only it with PlainKeys)
	locker   *redislock.Client
	node     string
	channel  string
	br       *breaker.Breaker
	timeouts *callTimeout
	metrics  *Metrics
	// refused is set when Redis refused a write (writeRefusal), and
	// cleared when a write succeeds or the breaker closes (doOnce).
	refused atomic.Bool
	// startsFailing is set when a start count (Store.CountStart) failed
	// and cleared when one succeeds: the failure that sets it is logged.
	startsFailing atomic.Bool

	vers   *versions // the token versions seen (version.go)
	rts    rtVersions
	unsent unsentPurges // purges Redis has not taken yet (resend.go)

	mu      sync.Mutex
	waiters map[string]map[chan struct{}]struct{}
	onPurge []*func(key, fingerprint string) // OnPurge's callbacks, in order; a pointer identifies one to unregister
	// availability are OnAvailability's functions, told when Redis
	// becomes unavailable and available again.
	availability []*func(up bool, err error)
	// active counts the lookups and the held refresh-token locks under
	// way; drained is Drain's function, called when it falls to 0.
	active  int
	drained func()

	ps     *redis.PubSub
	done   chan struct{}
	logged string // the last purge log entry applied (New's, then the listener's)
}

// New returns a Cache on opts.Client and subscribes to the fleet's channel.
// It does not fail when Redis is down: the Cache then mints locally until
// Redis answers.
func New(opts Options) (*Cache, error) {
	if opts.Client == nil {
		return nil, errors.New("fleet: Options.Client is required")
	}
	if opts.Keys == nil {
		return nil, errors.New("fleet: Options.Keys is required (the encryption key)")
	}
	if opts.KeyPrefix == "" {
		opts.KeyPrefix = DefaultKeyPrefix
	}
	opts.Timeout, opts.MaxTimeout = callBounds(opts.Timeout, opts.MaxTimeout)
	if opts.SlowSpan <= 0 {
		opts.SlowSpan = DefaultSlowSpan
	}
	opts.SlowSpan = max(opts.SlowSpan, 2*opts.MaxTimeout)
	if opts.LockTTL <= 0 {
		opts.LockTTL = DefaultLockTTL
	}
	if opts.LockPoll <= 0 {
		opts.LockPoll = DefaultLockPoll
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	id := make([]byte, 8)
	if _, err := rand.Read(id); err != nil {
		return nil, fmt.Errorf("fleet: node id: %w", err)
	}
	c := &Cache{
		opts:     opts,
		nameKeys: opts.Keys.Derive("token_broker redis key names"),
		locker:   redislock.New(opts.Client),
		node:     hex.EncodeToString(id),
		channel:  opts.KeyPrefix + "events",
		metrics:  newMetrics(),
		waiters:  map[string]map[chan struct{}]struct{}{},
		done:     make(chan struct{}),
		logged:   "0-0",
		vers:     newVersions(),
		rts:      rtVersions{m: map[string]rtSeen{}},
		unsent:   unsentPurges{m: map[unsentPurge]unsentFloor{}, wake: make(chan struct{}, 1)},
	}
	if opts.PlainKeys {
		c.nameKeys = c.nameKeys[:1] // a plain name is the same under every key
	}
	c.br = &breaker.Breaker{Threshold: BreakerThreshold, Cooldown: BreakerCooldown, SlowSpan: opts.SlowSpan}
	c.timeouts = newCallTimeout(opts.Timeout, opts.MaxTimeout, poolSize(opts.Client))
	c.ps = opts.Client.Subscribe(context.Background())
	// Wait (briefly) for the subscription to be confirmed, so that this
	// node hears announcements made right after New returns, then apply
	// the purges logged before. If Redis is down, the channel subscribes
	// when it comes back, and the listener catches up at each
	// confirmation of the subscription.
	sctx, cancel := context.WithTimeout(context.Background(), max(opts.Timeout, time.Second))
	err := c.ps.Subscribe(sctx, c.channel)
	if err == nil {
		if _, err = c.ps.ReceiveTimeout(sctx, max(opts.Timeout, time.Second)); err == nil {
			c.catchUp(false)
			c.checkEviction(sctx)
		}
	}
	var refused redis.Error
	switch {
	case err == nil:
		c.checkCommands(nil)
	case errors.As(err, &refused) && redis.IsAuthError(err): // WRONGPASS, or NOAUTH: a password is required
		opts.Logger.Error("redis refused the broker's credentials: check the redis settings username and password; this node mints without the shared tier until Redis accepts them",
			zap.Error(err))
	case refusedCommand(err) != "": // an ACL without SUBSCRIBE: one log with the other missing commands
		c.checkCommands(err)
	case errors.As(err, &refused): // an answer, such as an ACL's NOPERM on the channel
		c.checkCommands(nil)
		opts.Logger.Warn("redis refused the subscription to the fleet's channel "+c.channel+
			": this node will not hear purges nor tokens stored by others; grant the broker's user the channel (ACL SETUSER <user> &"+c.channel+")",
			zap.Error(err))
	}
	cancel()
	go c.listen(c.ps.ChannelWithSubscriptions(redis.WithChannelSize(1024)))
	return c, nil
}

// checkEviction warns when Redis's maxmemory-policy may evict keys
// without expiry (allkeys-*): the merchants' refresh tokens (rt:<name>)
// have none, and one evicted cannot be minted again. A Redis that does
// not let the broker's user read its configuration is not checked.
func (c *Cache) checkEviction(ctx context.Context) {
	conf, err := c.opts.Client.ConfigGet(ctx, "maxmemory-policy").Result()
	if policy := conf["maxmemory-policy"]; err == nil && strings.HasPrefix(policy, "allkeys-") {
		c.opts.Logger.Warn("redis maxmemory-policy "+policy+" may evict the merchants' refresh tokens, which have no expiry and cannot be minted again (the merchant would need consent again): set maxmemory-policy to noeviction or a volatile-* policy",
			zap.String("maxmemory_policy", policy))
	}
}

// Client is the Redis client the Cache runs on (Options.Client), for the
// broker's other users of the same Redis (the token-request budgets). The
// Cache does not close it.
func (c *Cache) Client() redis.UniversalClient { return c.opts.Client }

// KeyPrefix starts every Redis key of the Cache: Options.KeyPrefix, or
// DefaultKeyPrefix when that is not set.
func (c *Cache) KeyPrefix() string { return c.opts.KeyPrefix }

// Close stops listening to the fleet's announcements. It does not close
// the Redis client.
func (c *Cache) Close() error {
	err := c.ps.Close()
	<-c.done
	return err
}

// Drain calls done once no lookup (Fetch) nor refresh-token lock
// (Store.Lock) is under way: before it returns when none is, else when
// the last one ends. A lookup stores its token and releases its fleet lock
// at its end, so a client closed by done leaves no lock for the fleet to
// wait out.
func (c *Cache) Drain(done func()) {
	c.mu.Lock()
	if c.active > 0 {
		c.drained = done
		c.mu.Unlock()
		return
	}
	c.mu.Unlock()
	done()
}

// begin counts a lookup or a refresh-token lock under way; end its end.
func (c *Cache) begin() {
	c.mu.Lock()
	c.active++
	c.mu.Unlock()
}

func (c *Cache) end() {
	c.mu.Lock()
	c.active--
	var done func()
	if c.active == 0 {
		done, c.drained = c.drained, nil
	}
	c.mu.Unlock()
	if done != nil {
		done()
	}
}

// name is the Redis name part for a cache key: hashed with the current
// key's subkey unless PlainKeys.
func (c *Cache) name(key string) string { return c.nameWith(c.nameKeys[0], key) }

func (c *Cache) nameWith(nameKey []byte, key string) string {
	if c.opts.PlainKeys {
		q := strconv.QuoteToASCII(key) // injective, printable
		return q[1 : len(q)-1]
	}
	m := hmac.New(sha256.New, nameKey)
	m.Write([]byte(key))
	return hex.EncodeToString(m.Sum(nil))
}

// tokenKey is the Redis key that stores the token of cache key key.
func (c *Cache) tokenKey(key string) string { return c.opts.KeyPrefix + "tok:" + c.name(key) }

// lockKey is the Redis key of a subject's fleet lock.
func (c *Cache) lockKey(subject string) string { return c.opts.KeyPrefix + "lock:" + subject }

// do runs one Redis call (doOnce). If op can run twice with the same
// effect (retried), a run that timed out is followed by one with the
// longer bound the timeout gives then, until a run had Options.MaxTimeout,
// the breaker opens or ctx ends: at most one run per doubling from
// Options.Timeout to MaxTimeout, and one. Within a lookup (withRedisTime),
// each run's bound is cut to the lookup's Redis time left, and a call with
// none left returns errRedisTimeSpent without running.
func (c *Cache) do(ctx context.Context, op string, fn func(context.Context) error) error {
	runs := bits.Len64(uint64(c.opts.MaxTimeout/c.opts.Timeout)) + 1
	left := redisTimeOf(ctx)
	for run := 1; ; run++ {
		var limit time.Duration
		if left != nil {
			if limit = time.Duration(left.Load()); limit <= 0 {
				return errRedisTimeSpent
			}
		}
		started := time.Now()
		again, err := c.doOnce(ctx, op, fn, limit)
		if left != nil {
			left.Add(-int64(time.Since(started)))
		}
		if !again || !retried(op) || run >= runs || ctx.Err() != nil {
			return err
		}
	}
}

// errRedisTimeSpent is do's answer to a call of a lookup that has spent
// its Redis time: the lookup goes on without Redis.
var errRedisTimeSpent = errors.New("fleet: the lookup spent its Redis time (timeout_max) on slow calls")

// redisTimeKey is the context key of a lookup's Redis time.
type redisTimeKey struct{}

// withRedisTime returns ctx whose Redis calls (do) may last d together
// (nanoseconds left, shared by the calls); d <= 0: no such limit, for a
// mint's own calls within a lookup.
func withRedisTime(ctx context.Context, d time.Duration) context.Context {
	if d <= 0 {
		return context.WithValue(ctx, redisTimeKey{}, (*atomic.Int64)(nil))
	}
	left := new(atomic.Int64)
	left.Store(int64(d))
	return context.WithValue(ctx, redisTimeKey{}, left)
}

// redisTimeOf returns the Redis time left to ctx's calls, nil when
// unlimited.
func redisTimeOf(ctx context.Context) *atomic.Int64 {
	left, _ := ctx.Value(redisTimeKey{}).(*atomic.Int64)
	return left
}

// Run runs fn once as a Redis call of the tier, named op in metrics:
// through the breaker (ErrUnavailable while it keeps Redis out), within
// the adaptive bound, its outcome counted as any call's. It is for the
// broker's other users of the fleet's Redis (the token-request budgets),
// so that a slow or dead Redis costs them no more than it costs a lookup.
// op must not be one of the tier's retried calls.
func (c *Cache) Run(ctx context.Context, op string, fn func(context.Context) error) error {
	_, err := c.doOnce(ctx, op, fn, 0)
	return err
}

// retried reports whether do runs op again after a timeout: reads; the
// SET of a sealed value (the same value again); a lock taken, extended or
// released with the same owner token (obtain), an expiry given to a lock
// without one (repair). Not a purge (its script returns what it deleted,
// once), an announcement, nor a start count (Store.CountStart: its script
// adds one each run).
func retried(op string) bool {
	switch op {
	case "get", "pttl", "set", "lock", "repair", "unlock":
		return true
	}
	return false
}

// mayWrite reports whether op may write: a write refusal answering it
// (writeRefusal) says Redis refuses the tier's writes. Not a read, nor an
// announcement (a read-only replica takes PUBLISH).
func mayWrite(op string) bool {
	switch op {
	case "get", "pttl", "publish":
		return false
	}
	return true
}

// wrote reports whether op, succeeding (err nil), certainly wrote: a SET
// or a DEL, a lock taken, extended or released. Not a purge or a repair
// (their scripts may find nothing to write), nor a Run caller's call.
func wrote(op string) bool {
	switch op {
	case "set", "del", "lock", "unlock":
		return true
	}
	return false
}

// writeRefusal reports whether err is Redis refusing a write while it
// answers reads: a read-only replica (READONLY), maxmemory reached without
// eviction (OOM), an ACL without write commands (NOPERM), a failed
// snapshot (MISCONF), too few replicas (NOREPLICAS), and an ACL refusing a
// script's write (a plain error answer naming the script's user or an ACL
// failure). Other error answers (LOADING, BUSY, MASTERDOWN, WRONGTYPE...)
// are failures of the call only.
func writeRefusal(err error) bool {
	var answer redis.Error
	if !errors.As(err, &answer) {
		return false
	}
	msg := answer.Error()
	for _, p := range [...]string{"READONLY ", "OOM ", "NOPERM ", "MISCONF ", "NOREPLICAS ",
		"ERR The user executing the script can't run this command", "ERR ACL failure in script"} {
		if strings.HasPrefix(msg, p) {
			return true
		}
	}
	return false
}

// probeWrite writes this node's probe key (expiring after a cooldown):
// the call that probes a Redis that refused writes before it is let
// through again (doOnce).
func (c *Cache) probeWrite(ctx context.Context) error {
	return c.opts.Client.Set(ctx, c.opts.KeyPrefix+"probe:"+c.node, "1", BreakerCooldown).Err()
}

// doOnce is one run of do through the breaker, within limit (0: none) as
// well as its adaptive bound (timeout.go); again reports a timeout that a
// longer bound may cure. redis.Nil and the lock's refusals are answers,
// not failures; a run that timed out within a limit shorter than its bound
// teaches nothing about Redis's speed.
func (c *Cache) doOnce(ctx context.Context, op string, fn func(context.Context) error, limit time.Duration) (again bool, err error) {
	if ok, _, _, _ := c.br.Allow(c.opts.Now()); !ok {
		return false, ErrUnavailable
	}
	// The probe of a Redis that refused writes writes first: a read it
	// answers would not say that it takes writes again.
	probed := false
	if c.refused.Load() && c.br.State() == breaker.HalfOpen {
		next := fn
		fn = func(ctx context.Context) error {
			if err := c.probeWrite(ctx); err != nil {
				return err
			}
			probed = true
			return next(ctx)
		}
	}
	call := c.timeouts.start()
	bound, cut := call.bound, limit > 0 && limit < call.bound
	if cut {
		bound = limit
	}
	started := time.Now()
	cctx, cancel := context.WithTimeout(ctx, bound)
	err = fn(cctx)
	cancel()
	outcome := breaker.Failed
	switch {
	case err == nil, errors.Is(err, redis.Nil), errors.Is(err, redislock.ErrNotObtained), errors.Is(err, redislock.ErrLockNotHeld):
		outcome = breaker.Healthy
		c.timeouts.succeeded(time.Since(started))
		c.redisAnswered()
	case ctx.Err() != nil, cut && isSlow(err):
		outcome = breaker.Unknown // the caller gave up, or a cut run ran out: not Redis's fault
		c.timeouts.ended()
	case isSlow(err):
		outcome = breaker.Slow
		c.timeouts.timedOut(call)
		c.metrics.errors.WithLabelValues(op).Inc()
		c.metrics.timeouts.WithLabelValues(op).Inc()
	default:
		c.timeouts.ended()
		c.metrics.errors.WithLabelValues(op).Inc()
	}
	// Once Redis has refused a write, reads do not vouch for it until a
	// write succeeds (the package documentation).
	switch {
	case outcome == breaker.Failed && (mayWrite(op) || probed) && writeRefusal(err):
		c.refused.Store(true)
	case probed || (err == nil && wrote(op)):
		c.refused.Store(false)
	case outcome == breaker.Healthy && c.refused.Load():
		outcome = breaker.Unknown
	}
	from, to := c.br.Record(c.opts.Now(), outcome, err)
	switch {
	case from == breaker.Closed && to == breaker.Open:
		c.metrics.openings.Inc()
		c.opts.Logger.Warn("redis unavailable: minting locally without the shared tier until it answers again",
			zap.Duration("cooldown", BreakerCooldown), zap.Error(err))
		c.tellAvailability(false, err)
	case from != breaker.Closed && to == breaker.Closed:
		c.refused.Store(false)
		c.opts.Logger.Info("redis available again: sharing tokens with the fleet")
		c.tellAvailability(true, nil)
	}
	return outcome == breaker.Slow && to != breaker.Open && call.base < c.opts.MaxTimeout, err
}

// OnAvailability registers f, until unregister is called, to be told
// when Redis becomes unavailable (the breaker opens after consecutive
// failures: up is false, err the last failure) and when it answers again
// (up true). Each user of a Cache shared across config reloads registers
// its own and unregisters it when done, so a config that fails to load
// leaves the running one told. f is called on the request path: it must
// be quick. A nil f is ignored: nothing is registered, and unregister
// does nothing.
func (c *Cache) OnAvailability(f func(up bool, err error)) (unregister func()) {
	if f == nil {
		return func() {}
	}
	return register(&c.mu, &c.availability, f)
}

// Metrics returns the collectors that count what the tier does.
func (c *Cache) Metrics() *Metrics { return c.metrics }

// Available reports whether the tier uses Redis now: false while its
// breaker keeps Redis out after consecutive failures.
func (c *Cache) Available() bool { return c.br.State() != breaker.Open }

// tellAvailability calls the OnAvailability functions.
func (c *Cache) tellAvailability(up bool, err error) {
	c.mu.Lock()
	hooks := slices.Clone(c.availability)
	c.mu.Unlock()
	for _, f := range hooks {
		(*f)(up, err)
	}
}

// wireToken is a Token as sealed in Redis.
type wireToken struct {
	Value    string   `json:"v"`
	Type     string   `json:"t,omitempty"`
	Expiry   int64    `json:"e"`
	ID       string   `json:"id,omitempty"`
	Scopes   []string `json:"s,omitempty"`
	IssuedAt int64    `json:"i,omitempty"`
	// RefreshAt is the refresh the minting node planned (Unix ns); 0
	// (absent) when none.
	RefreshAt int64 `json:"r,omitempty"`
	// Version orders the values of one key (version.go); 0 (absent) is
	// older than every version.
	Version int64 `json:"w,omitempty"`
}

// fpLen is the length of the clear fingerprint in front of a stored token,
// which the purge script compares.
const fpLen = 8

// tokenAD is the associated data of a stored token: the cache key and the
// fingerprint in front of it.
func tokenAD(key, fp string) []byte { return []byte("tok\x00" + key + "\x00" + fp) }

// encode seals tok for key, as version ver: its fingerprint, then the
// sealed token.
func (c *Cache) encode(key string, tok broker.Token, ver int64) ([]byte, error) {
	w := wireToken{Value: tok.Value.Reveal(), Type: tok.Type, Expiry: tok.Expiry.UnixNano(), ID: tok.ID, Scopes: tok.Scopes, Version: ver}
	if !tok.IssuedAt.IsZero() {
		w.IssuedAt = tok.IssuedAt.UnixNano()
	}
	if !tok.RefreshAt.IsZero() {
		w.RefreshAt = tok.RefreshAt.UnixNano()
	}
	pt, err := json.Marshal(w)
	if err != nil {
		return nil, err
	}
	fp := tok.Fingerprint()
	sealed, err := c.opts.Keys.Seal(pt, tokenAD(key, fp))
	if err != nil {
		return nil, err
	}
	return append([]byte(fp), sealed...), nil
}

// decode opens a stored token of key and returns it with its version; ok
// is false (and the value counted) when it does not open.
func (c *Cache) decode(key string, b []byte) (tok broker.Token, ver int64, ok bool) {
	if len(b) < fpLen {
		c.undecryptable(key, seal.ErrMalformed)
		return broker.Token{}, 0, false
	}
	fp := string(b[:fpLen])
	pt, err := c.opts.Keys.Open(b[fpLen:], tokenAD(key, fp))
	if err != nil {
		c.undecryptable(key, err)
		return broker.Token{}, 0, false
	}
	var w wireToken
	if err := json.Unmarshal(pt, &w); err != nil || w.Value == "" {
		c.undecryptable(key, errors.New("the sealed value is not a token"))
		return broker.Token{}, 0, false
	}
	tok = broker.Token{Value: broker.Secret(w.Value), Type: w.Type, Expiry: time.Unix(0, w.Expiry), ID: w.ID, Scopes: w.Scopes}
	if w.IssuedAt != 0 {
		tok.IssuedAt = time.Unix(0, w.IssuedAt)
	}
	if w.RefreshAt != 0 {
		tok.RefreshAt = time.Unix(0, w.RefreshAt)
	}
	return tok, w.Version, true
}

// rolledBack counts and logs a value older than the newest this node has
// seen for its key, which is then ignored.
func (c *Cache) rolledBack(redisKey string) {
	c.metrics.rolledBack.Inc()
	c.opts.Logger.Warn("ignoring a value in redis older than one this node has seen for its key (an old value written back: a purged token, a spent refresh token, or a failover that lost the newest write)",
		zap.String("redis_key", redisKey))
}

func (c *Cache) undecryptable(key string, err error) {
	c.metrics.undecryptable.Inc()
	c.opts.Logger.Warn("ignoring a value in redis that does not open (another encryption key, or altered); it will be replaced",
		zap.String("redis_key", c.tokenKey(key)), zap.Error(err))
}

// read returns the token stored for key, its times on this node's clock
// (onClock). found is false when there is none, it does not open, or it
// is older than one this node has seen for key (version.go); err is a
// Redis failure. After a key rotation, a token stored under the old key's
// name (by nodes not yet rotated) is found too.
func (c *Cache) read(ctx context.Context, key string) (tok broker.Token, found bool, err error) {
	for _, nk := range c.nameKeys {
		name := c.opts.KeyPrefix + "tok:" + c.nameWith(nk, key)
		b, asked, left, err := c.getToken(ctx, name)
		if errors.Is(err, redis.Nil) {
			continue
		}
		if err != nil {
			return broker.Token{}, false, err
		}
		tok, ver, ok := c.decode(key, b)
		if !ok {
			continue
		}
		tok = onClock(tok, asked, left)
		now := c.opts.Now()
		if !c.vers.accept(key, ver, now) {
			c.rolledBack(name)
			continue
		}
		c.vers.saw(key, ver, tok.Fingerprint(), tok.Expiry, now)
		return tok, true, nil
	}
	return broker.Token{}, false, nil
}

// get reads the value stored under the Redis key name: redis.Nil when
// there is none.
func (c *Cache) get(ctx context.Context, name string) ([]byte, error) {
	var b []byte
	err := c.do(ctx, "get", func(ctx context.Context) error {
		var err error
		b, err = c.opts.Client.Get(ctx, name).Bytes()
		return err
	})
	return b, err
}

// getToken reads the token stored under the Redis key name and the time
// it has left to live, in one round trip, and when this node's clock read
// asked (just before that round trip): redis.Nil when there is none.
func (c *Cache) getToken(ctx context.Context, name string) (b []byte, asked time.Time, left time.Duration, err error) {
	err = c.do(ctx, "get", func(ctx context.Context) error {
		asked = c.opts.Now()
		var get *redis.StringCmd
		var pttl *redis.DurationCmd
		if _, err := c.opts.Client.Pipelined(ctx, func(p redis.Pipeliner) error {
			get, pttl = p.Get(ctx, name), p.PTTL(ctx, name)
			return nil
		}); err != nil {
			return err
		}
		b, left = []byte(get.Val()), pttl.Val()
		return nil
	})
	return b, asked, left, err
}

// clockSlack is how much earlier than a stored token's expiry its key may
// expire in Redis before onClock moves the token's times (the calls'
// latency, not clocks that differ).
const clockSlack = time.Second

// onClock returns tok, read from Redis with left to live when this
// node's clock read asked (before the read), with its times moved earlier
// when its expiry is later than asked + left by more than clockSlack. Its
// key expires with the token on Redis's clock (write), so asked + left is
// the token's expiry on this node's clock: a minting clock ahead would
// otherwise have it served after it expired. A minting clock behind only
// has it refreshed early. A key without expiry (left < 0) leaves tok as
// it is.
func onClock(tok broker.Token, asked time.Time, left time.Duration) broker.Token {
	shift := asked.Add(left).Sub(tok.Expiry)
	if left < 0 || shift >= -clockSlack {
		return tok
	}
	tok.Expiry = tok.Expiry.Add(shift)
	if !tok.IssuedAt.IsZero() {
		tok.IssuedAt = tok.IssuedAt.Add(shift)
	}
	if !tok.RefreshAt.IsZero() {
		tok.RefreshAt = tok.RefreshAt.Add(shift)
	}
	return tok
}

// write stores tok for key until its expiry. Failures are only counted: the
// token is still used.
func (c *Cache) write(ctx context.Context, key string, tok broker.Token) {
	now := c.opts.Now()
	ttl := tok.Expiry.Sub(now)
	if ttl < time.Millisecond {
		return
	}
	ver := c.vers.next(key, now)
	c.vers.saw(key, ver, tok.Fingerprint(), tok.Expiry, now)
	b, err := c.encode(key, tok, ver)
	if err != nil {
		c.opts.Logger.Error("sealing a token for redis", zap.Error(err))
		return
	}
	_ = c.do(ctx, "set", func(ctx context.Context) error {
		return c.opts.Client.Set(ctx, c.tokenKey(key), b, ttl).Err()
	})
}

// Fetch implements broker.SharedCache. When the fetch is traced, the
// shared tier's work is a span "token_broker.l2" under the token span, with
// how the token was obtained: "adopted" (from another node), "minted"
// (under the fleet lock) or "bypassed" (Redis unavailable, or another
// node's lock waited on for Options.LockTTL: minted locally).
// The token span's token API calls made for a mint are its children.
func (c *Cache) Fetch(ctx context.Context, key string, usable func(broker.Token) bool, mint func(context.Context) (broker.Token, error)) (broker.Token, bool, error) {
	c.begin()
	defer c.end()
	parent := trace.SpanFromContext(ctx)
	if !parent.IsRecording() {
		tok, how, err := c.fetch(ctx, key, usable, mint)
		return tok, how == howAdopted, err
	}
	ctx, span := parent.TracerProvider().Tracer(spans.TracerName).Start(ctx, l2SpanName, trace.WithSpanKind(trace.SpanKindInternal))
	defer span.End()
	tok, how, err := c.fetch(ctx, key, usable, mint)
	span.SetAttributes(attribute.String("token_broker.l2.outcome", how))
	if err != nil {
		// Errors come from the token API (no credential, broker.Source's
		// contract) or from the context.
		span.SetStatus(codes.Error, err.Error())
	} else {
		span.SetAttributes(spans.Fingerprint.String(tok.Fingerprint()))
	}
	return tok, how == howAdopted, err
}

// l2SpanName is the span of a lookup in the shared tier.
const l2SpanName = "token_broker.l2"

// How a lookup obtained its token (Fetch).
const (
	howAdopted  = "adopted"
	howMinted   = "minted"
	howBypassed = "bypassed"
)

// fetch is Fetch; it returns how the token was obtained ("" when the
// context ended first).
//
// The lookup's Redis calls before the mint last at most
// Options.MaxTimeout together (withRedisTime); then it mints without
// Redis. The mint runs on the caller's context, its own calls to Redis (a
// refresh token's) not counted in the lookup's; storing and announcing the
// token get MaxTimeout of their own (afterMint), as does releasing the
// lock (held.release).
func (c *Cache) fetch(ctx context.Context, key string, usable func(broker.Token) bool, mint func(context.Context) (broker.Token, error)) (broker.Token, string, error) {
	callerMint, mintCtx := mint, withRedisTime(ctx, 0)
	mint = func(context.Context) (broker.Token, error) { return callerMint(mintCtx) }
	ctx = withRedisTime(ctx, c.opts.MaxTimeout)
	// A lookup whose context has ended is not a bypass: it mints nothing.
	bypass := func() (broker.Token, string, error) {
		if ctx.Err() != nil {
			return broker.Token{}, "", ctx.Err()
		}
		c.metrics.bypassed.Inc()
		tok, err := mint(ctx)
		return tok, howBypassed, err
	}
	tok, found, err := c.read(ctx, key)
	if err != nil {
		return bypass()
	}
	if found && usable(tok) {
		c.metrics.lookups.WithLabelValues("hit").Inc()
		return tok, howAdopted, nil
	}
	c.metrics.lookups.WithLabelValues("miss").Inc()

	subject := "tok:" + c.name(key)
	wake, stop := c.watch(subject)
	defer stop()
	waited := false
	var waitingSince, waitingSinceWall time.Time
	for {
		l, err := c.obtain(ctx, subject)
		if err == nil {
			return c.fetchLocked(ctx, key, subject, l, usable, mint)
		}
		if !errors.Is(err, redislock.ErrNotObtained) {
			return bypass()
		}
		switch {
		case !waited:
			waited, waitingSince, waitingSinceWall = true, c.opts.Now(), time.Now()
			c.metrics.lockWaits.Inc()
		case c.opts.Now().Sub(waitingSince) >= c.opts.LockTTL || time.Since(waitingSinceWall) >= c.opts.LockTTL:
			// No lock of ours is held longer than a mint takes (the fetch
			// timeout, at most LockTTL): this one is stuck. The wait runs
			// on real timers, so it is measured on the real clock as well
			// as on Options.Now.
			c.opts.Logger.Warn("waited lock_ttl for another node's lock of a key: minting without it",
				zap.String("redis_key", c.lockKey(subject)), zap.Duration("lock_ttl", c.opts.LockTTL))
			c.metrics.bypassed.Inc()
			return c.mintUnlocked(ctx, key, subject, mint)
		}
		if err := c.waitLock(ctx, subject, wake); err != nil {
			return bypass()
		}
		tok, found, err := c.read(ctx, key)
		if err != nil {
			return bypass()
		}
		if found && usable(tok) {
			c.metrics.adopted.Inc()
			return tok, howAdopted, nil
		}
	}
}

// fetchLocked is Fetch under the key's lock: read again, mint, store,
// release, announce.
func (c *Cache) fetchLocked(ctx context.Context, key, subject string, l *held, usable func(broker.Token) bool, mint func(context.Context) (broker.Token, error)) (broker.Token, string, error) {
	kind := "unlock"
	after := c.afterMint(ctx)
	defer func() {
		l.release()
		c.publish(after, event{Kind: kind, Subject: subject})
	}()
	tok, found, err := c.read(ctx, key)
	if err == nil && found && usable(tok) {
		c.metrics.adopted.Inc()
		return tok, howAdopted, nil
	}
	tok, err = mint(ctx)
	if err != nil {
		return broker.Token{}, howMinted, err
	}
	c.write(after, key, tok)
	kind = "set"
	return tok, howMinted, nil
}

// mintUnlocked mints without the key's lock, stores the token and
// announces it, so that the other nodes waiting on the same lock adopt it.
func (c *Cache) mintUnlocked(ctx context.Context, key, subject string, mint func(context.Context) (broker.Token, error)) (broker.Token, string, error) {
	tok, err := mint(ctx)
	if err != nil {
		return broker.Token{}, howBypassed, err
	}
	after := c.afterMint(ctx)
	c.write(after, key, tok)
	_ = c.publish(after, event{Kind: "set", Subject: subject})
	return tok, howBypassed, nil
}

// afterMint is the context of a lookup's calls after its mint (store,
// announce): not cancelled with the caller's, with Options.MaxTimeout of
// Redis time of its own.
func (c *Cache) afterMint(ctx context.Context) context.Context {
	return withRedisTime(context.WithoutCancel(ctx), c.opts.MaxTimeout)
}

// purge is Purge's compare-and-delete of p and its announcement, with the
// floor of f, which purged sets after the delete for a purge made now: a
// purge sent again announces the floor of its first try. announced reports
// whether Redis took the announcement.
func (c *Cache) purge(ctx context.Context, p unsentPurge, f *unsentFloor) (announced bool, _ error) {
	var purgeErr error
	for _, nk := range c.nameKeys {
		name := c.opts.KeyPrefix + "tok:" + c.nameWith(nk, p.key)
		var deleted string
		err := c.do(ctx, "purge", func(ctx context.Context) error {
			var err error
			deleted, err = purgeScript.Run(ctx, c.opts.Client, []string{name}, p.fingerprint).Text()
			return err
		})
		if err != nil && !errors.Is(err, redis.Nil) {
			// The token may stay in Redis: this node refuses it from now
			// on, and the others if Redis answered (an error answer).
			purgeErr = fmt.Errorf("fleet: purging %s: %w", name, err)
			if !writeRefusal(err) {
				c.purged(p, f)
				return false, purgeErr
			}
			break
		}
		if len(deleted) > 0 {
			if tok, ver, ok := c.decode(p.key, []byte(deleted)); ok {
				c.vers.saw(p.key, ver, tok.Fingerprint(), tok.Expiry, c.opts.Now())
			}
		}
	}
	c.purged(p, f)
	e := event{Kind: "purge", Subject: "tok:" + c.name(p.key), Fingerprint: p.fingerprint}
	var err error
	if e.Key, err = c.opts.Keys.Seal([]byte(p.key), purgeAD(c.name(p.key))); err != nil {
		return false, fmt.Errorf("%w: %w", errSeal, err)
	}
	if f.floor != 0 {
		if e.Floor, err = c.opts.Keys.Seal(binary.BigEndian.AppendUint64(binary.BigEndian.AppendUint64(nil, uint64(f.floor)), uint64(f.until)), floorAD(c.name(p.key))); err != nil {
			return false, fmt.Errorf("%w: %w", errSeal, err)
		}
	}
	err = c.publish(ctx, e)
	return err == nil, errors.Join(purgeErr, err)
}

// errSeal is a purge's error when its announcement could not be sealed: a
// try again would fail the same way.
var errSeal = errors.New("fleet: sealing a purge announcement")

// purgeScript deletes KEYS[1] if its value starts with the fingerprint
// ARGV[1], or whatever it stores if ARGV[1] is empty; it returns the value
// it deleted, or false.
var purgeScript = redis.NewScript(`
local v = redis.call("GET", KEYS[1])
if not v then return false end
if ARGV[1] == "" or string.sub(v, 1, ` + fmt.Sprint(fpLen) + `) == ARGV[1] then
	redis.call("DEL", KEYS[1])
	return v
end
return false
`)

func purgeAD(name string) []byte { return []byte("purge\x00" + name) }

// floorAD is the associated data of a purge announcement's floor.
func floorAD(name string) []byte { return []byte("purge-floor\x00" + name) }

// OnPurge implements broker.SharedCache.
func (c *Cache) OnPurge(fn func(key, fingerprint string)) (unregister func()) {
	return register(&c.mu, &c.onPurge, fn)
}

// register appends f to *hooks under mu and returns the function that
// removes it (a pointer identifies it).
func register[F any](mu *sync.Mutex, hooks *[]*F, f F) (unregister func()) {
	hook := &f
	mu.Lock()
	defer mu.Unlock()
	*hooks = append(*hooks, hook)
	return func() {
		mu.Lock()
		defer mu.Unlock()
		*hooks = slices.DeleteFunc(*hooks, func(h *F) bool { return h == hook })
	}
}

var _ broker.SharedCache = (*Cache)(nil)
