package oauth

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"sync"
	"time"
)

// ErrUnknownPending is returned by PendingStore.Get and Take when nothing
// is stored under the key: it never was, it was already taken, or it was
// dropped.
var ErrUnknownPending = errors.New("unknown or already used")

// PendingStore keeps the consents in progress (consent links and
// authorization states), sealed by Pendings, between the request that
// creates them and the one that uses them (kvstore.Pending,
// MemoryPendingStore). Implementations must be safe for concurrent use,
// and should drop expired values (Pendings checks the expiry anyway).
type PendingStore interface {
	// Put stores val under key until expires.
	Put(ctx context.Context, key string, val []byte, expires time.Time) error
	// Get returns the value under key without deleting it, or an error
	// wrapping ErrUnknownPending when there is none.
	Get(ctx context.Context, key string) ([]byte, error)
	// Take returns the value under key and deletes it, atomically: of
	// concurrent Takes of one key at most one gets the value. It returns an
	// error wrapping ErrUnknownPending when there is none.
	Take(ctx context.Context, key string) ([]byte, error)
}

// PendingSweepInterval is how often expired consents are dropped.
const PendingSweepInterval = time.Minute

// MemoryPendingStore is a PendingStore in memory, lost with the process
// and not shared between instances. It drops expired values on its first
// use PendingSweepInterval after the last sweep. The zero value is ready
// to use.
type MemoryPendingStore struct {
	// Now is the clock. Default time.Now.
	Now func() time.Time

	mu    sync.Mutex
	m     map[string]memoryPending
	swept time.Time // last sweep
}

type memoryPending struct {
	val     []byte
	expires time.Time
}

func (s *MemoryPendingStore) now() time.Time {
	if s.Now == nil {
		return time.Now()
	}
	return s.Now()
}

// sweepLocked drops expired values once per PendingSweepInterval.
func (s *MemoryPendingStore) sweepLocked(now time.Time) {
	if now.Sub(s.swept) < PendingSweepInterval {
		return
	}
	s.swept = now
	for k, v := range s.m {
		if !now.Before(v.expires) {
			delete(s.m, k)
		}
	}
}

// Put implements PendingStore.
func (s *MemoryPendingStore) Put(_ context.Context, key string, val []byte, expires time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = map[string]memoryPending{}
	}
	s.sweepLocked(s.now())
	s.m[key] = memoryPending{val: val, expires: expires}
	return nil
}

// get returns the value under key, expired or not (Pendings tells an
// expired record from an unknown one while it is not swept).
func (s *MemoryPendingStore) get(key string) ([]byte, error) {
	s.sweepLocked(s.now())
	v, ok := s.m[key]
	if !ok {
		return nil, ErrUnknownPending
	}
	return v.val, nil
}

// Get implements PendingStore.
func (s *MemoryPendingStore) Get(_ context.Context, key string) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.get(key)
}

// Take implements PendingStore.
func (s *MemoryPendingStore) Take(_ context.Context, key string) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, err := s.get(key)
	delete(s.m, key)
	return v, err
}

// Pending is one consent in progress: a consent link, or an authorization
// request waiting for its callback. It has the PKCE verifier and the
// nonce, so it is only ever stored sealed.
type Pending struct {
	// Provider is the provider's name.
	Provider string `json:"p"`
	// Merchant is the merchant who consents.
	Merchant string `json:"m"`
	// ReturnURL is where the browser is sent after the callback, checked
	// against the provider's allow-list. Optional.
	ReturnURL string `json:"r,omitempty"`
	// RedirectURI is the registered callback URL of this consent.
	RedirectURI string `json:"u"`
	// Verifier is the PKCE code verifier (authorization states only).
	Verifier string `json:"v,omitempty"`
	// Nonce is the OpenID nonce, when openid is asked for.
	Nonce string `json:"n,omitempty"`
	// Browser is the hex SHA-256 of the secret of the browser that started
	// the consent (authorization states started with a Browser only).
	Browser string `json:"b,omitempty"`
	// Link is the consent link an authorization state was started from
	// (authorization states only; see AuthCode.claimLink).
	Link string `json:"l,omitempty"`
	// Expires is when the link or the state stops being accepted.
	Expires time.Time `json:"e"`
	// Code is the digest of the code whose exchange is to be tried again
	// (authorization states kept for a reload only).
	Code string `json:"c,omitempty"`
	// Tries is how many callbacks exchanged Code and failed so.
	Tries int `json:"t,omitempty"`
	// Retry is when Code may be exchanged again.
	Retry time.Time `json:"w,omitzero"`
}

// Browser is the secret of the browser that runs a consent, kept in a
// cookie: Callback accepts a state only from the browser Start bound it to
// (RFC 9700 §4.7.1).
type Browser string

// NewBrowser returns a new random browser secret.
func NewBrowser() Browser { return Browser(randomString(32)) }

// hash is the digest of the secret, "" for none.
func (b Browser) hash() string { return digest("browser", string(b)) }

// digest is the hex SHA-256 of the secret s of a kind (browser, code),
// "" for none.
func digest(kind, s string) string {
	if s == "" {
		return ""
	}
	h := sha256.Sum256([]byte("token_broker consent " + kind + "\x00" + s))
	return hex.EncodeToString(h[:])
}

// ReasonWrongBrowser is the refusal of a callback from a browser other
// than the one that opened the consent link (its cookie is missing or
// differs); the state is left for the right browser.
const ReasonWrongBrowser = "wrong_browser"

// Pendings keeps consents in progress in a PendingStore, each sealed for
// its secret, the link id or the state (Sealed): only the bearer of the
// link or state can open its record.
type Pendings struct {
	// Store keeps the sealed records.
	Store PendingStore
	// Now is the clock. Default: the source's (NewAuthCode).
	Now func() time.Time
}

// Kinds of pending records.
const (
	kindLink  = "link"
	kindState = "state"
)

// randomString returns n random bytes, base64url-encoded.
func randomString(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never fails (Go 1.24)
	return base64.RawURLEncoding.EncodeToString(b)
}

// WellFormed reports whether s has the shape of the consent links,
// states and browser secrets this package hands out: 32 bytes,
// base64url-encoded.
func WellFormed(s string) bool {
	b, err := base64.RawURLEncoding.DecodeString(s)
	return err == nil && len(b) == 32
}

// sealed returns the sealed records of kind and the name a record of
// secret is sealed for, so that a link never opens as a state.
func (p *Pendings) sealed(kind, secret string) (Sealed, string) {
	return Sealed{Store: p.Store, Domain: "token_broker consent ", Prefix: kind}, kind + "\x00" + secret
}

// storeKey is the store key of the record of secret.
func (p *Pendings) storeKey(kind, secret string) string {
	s, name := p.sealed(kind, secret)
	key, _ := s.keys(name)
	return key
}

// put seals rec under secret, kept in the store until rec expires.
func (p *Pendings) put(ctx context.Context, kind, secret string, rec Pending) error {
	return p.putUntil(ctx, kind, secret, rec, rec.Expires)
}

// putUntil seals rec under secret, kept in the store until kept.
func (p *Pendings) putUntil(ctx context.Context, kind, secret string, rec Pending, kept time.Time) error {
	s, name := p.sealed(kind, secret)
	return s.Put(ctx, name, rec, kept)
}

// get opens the record of secret and leaves it stored, with the errors
// of take.
func (p *Pendings) get(ctx context.Context, kind, secret string) (Pending, error) {
	s, name := p.sealed(kind, secret)
	return p.open(ctx, s.Get, name, secret)
}

// take opens and consumes the record of secret: ErrUnknownPending when
// there is none, errExpired (with the record) when it has expired.
func (p *Pendings) take(ctx context.Context, kind, secret string) (Pending, error) {
	s, name := p.sealed(kind, secret)
	return p.open(ctx, s.Take, name, secret)
}

// open reads the record of secret with read (Sealed.Get or Take), as
// take does.
func (p *Pendings) open(ctx context.Context, read func(context.Context, string, any) error, name, secret string) (Pending, error) {
	if secret == "" || len(secret) > 512 {
		return Pending{}, ErrUnknownPending
	}
	var rec Pending
	if err := read(ctx, name, &rec); err != nil {
		return Pending{}, err
	}
	if !p.Now().Before(rec.Expires) {
		return rec, errExpired
	}
	return rec, nil
}

// getFrom is get that also fails with errWrongBrowser (with the record)
// when the record is bound to another browser.
func (p *Pendings) getFrom(ctx context.Context, kind, secret string, browser Browser) (Pending, error) {
	rec, err := p.get(ctx, kind, secret)
	if (err == nil || errors.Is(err, errExpired)) && rec.Browser != "" && subtle.ConstantTimeCompare([]byte(rec.Browser), []byte(browser.hash())) != 1 {
		return rec, errWrongBrowser
	}
	return rec, err
}

var (
	errExpired      = errors.New("expired")
	errWrongBrowser = errors.New("opened in another browser")
)
