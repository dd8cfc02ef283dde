package oauth

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// RefreshToken is a broker.Source for merchants who consented through the
// authorization code flow: it exchanges each merchant's refresh token,
// kept in a Store under StoreKey(Config, merchant), for access tokens
// (RFC 6749 §6). It is safe for concurrent use.
type RefreshToken struct {
	*core
	store Store

	mu      sync.Mutex
	last    map[string]*refreshed    // by store key: the latest refresh, while its token is valid
	pending map[string]unsaved       // by store key: the rotated token whose Save failed
	status  map[string]ConsentStatus // by merchant (authcode.go)
	sweep   int                      // refreshes until the next sweep of last
	running int                      // Token's refreshes admitted and not ended (Wait)
	idle    chan struct{}            // closed when running falls to 0; made by Wait
	// closing ends with Close (cause ErrClosed): no refresh starts.
	closing context.Context
	close   context.CancelCauseFunc
}

// unsaved is a rotated refresh token whose save failed, with the one it
// replaced.
type unsaved struct{ rt, replaced broker.Secret }

// sweepEvery is how many refreshes pass between two sweeps of the expired
// entries of RefreshToken.last.
const sweepEvery = 64

// refreshed is the result of one refresh; each refresh stores a new one.
type refreshed struct {
	req string // scopes and audience
	tok broker.Token
	// abandoned: the call that refreshed had returned before the answer
	// came, so the next call takes the token, whenever it started.
	// Guarded by RefreshToken.mu.
	abandoned bool
}

// ConsentRequiredError is returned when a merchant's refresh token cannot be
// used: the provider refused it (invalid_grant), or none is stored. The
// merchant must consent again. It is permanent.
type ConsentRequiredError struct {
	// Provider is the provider's name.
	Provider string
	// Merchant is the merchant whose consent is needed.
	Merchant string
	// Err is the provider's refusal (*broker.APIError with Code
	// "invalid_grant") or ErrNoRefreshToken.
	Err error
}

// Error says what happened and what to do, without the refresh token.
func (e *ConsentRequiredError) Error() string {
	why := "the provider refused the refresh token"
	var ae *broker.APIError
	switch {
	case errors.Is(e.Err, ErrNoRefreshToken):
		why = "no refresh token is stored for it"
	case errors.As(e.Err, &ae) && ae.Description != "":
		why += fmt.Sprintf(" (%s: %s)", ae.Code, ae.Description)
	case ae != nil:
		why += fmt.Sprintf(" (%s)", ae.Code)
	}
	return fmt.Sprintf("merchant %q, oauth2 provider %q: %s: the merchant must consent again (authorization-code flow), then an operator must load the new refresh token", e.Merchant, e.Provider, why)
}

// Unwrap returns the cause and, when the cause is not the provider's
// answer, a permanent *broker.RequestError so that the broker does not
// retry.
func (e *ConsentRequiredError) Unwrap() []error {
	var ae *broker.APIError
	if errors.As(e.Err, &ae) {
		return []error{e.Err}
	}
	return []error{e.Err, &broker.RequestError{Merchant: e.Merchant, Field: "refresh_token", Reason: "no refresh token is stored"}}
}

// SaveError is returned when the provider rotated a refresh token and the
// Store could not save the new one. The source keeps the new one in memory
// and saves it at the merchant's next refresh while the store still holds
// the token it replaced (unsavedOrStored).
type SaveError struct {
	// Merchant is the merchant whose refresh token was rotated.
	Merchant string
	// Err is the Store's error.
	Err error
}

// Error describes the failure.
func (e *SaveError) Error() string {
	return fmt.Sprintf("merchant %q: the provider rotated the refresh token but storing the new one failed: %v (it is kept in memory, and saved and used at the merchant's next refresh if the store still holds the token it replaced; if the broker stops first, the merchant must consent again)", e.Merchant, e.Err)
}

// Unwrap returns the Store's error.
func (e *SaveError) Unwrap() error { return e.Err }

// NewRefreshToken returns a refresh token source that keeps its refresh
// tokens in store.
func NewRefreshToken(cfg Config, store Store) (*RefreshToken, error) {
	if store == nil {
		return nil, fmt.Errorf("oauth2 provider %s: the refresh_token grant needs a refresh-token store", cfg.Name)
	}
	c, err := newCore(cfg)
	if err != nil {
		return nil, err
	}
	closing, closeAll := context.WithCancelCause(context.Background())
	return &RefreshToken{core: c, store: store, last: map[string]*refreshed{}, pending: map[string]unsaved{}, status: map[string]ConsentStatus{},
		closing: closing, close: closeAll}, nil
}

// ErrClosed is Token's error once Close was called: a refresh sent now
// might get a rotated refresh token after the process ended. It is
// temporary.
var ErrClosed = errors.New("no refresh starts: the refresh-token source is closed, the process is exiting")

// Close has Token refuse with ErrClosed the refreshes that have not sent
// their request yet, also those waiting for the merchant's lock: call it
// when the process exits, then Wait.
func (s *RefreshToken) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.close(ErrClosed)
}

// Wait returns once no refresh admitted by Token is under way, or when ctx
// ends with how many still are. A refresh once sent outlives its caller
// (see Token): wait for it before the process exits.
func (s *RefreshToken) Wait(ctx context.Context) int {
	s.mu.Lock()
	if s.running > 0 && s.idle == nil {
		s.idle = make(chan struct{})
	}
	idle := s.idle
	s.mu.Unlock()
	if idle == nil {
		return 0
	}
	select {
	case <-idle:
		return 0
	case <-ctx.Done():
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.running
	}
}

// ended ends a refresh Token admitted.
func (s *RefreshToken) ended() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.running--; s.running == 0 && s.idle != nil {
		close(s.idle)
		s.idle = nil
	}
}

// StoreKey returns the key of merchant's refresh token in the Store.
func (s *RefreshToken) StoreKey(merchant string) string { return StoreKey(s.cfg, merchant) }

// Store returns the store of the refresh tokens.
func (s *RefreshToken) Store() Store { return s.store }

// PerMerchant implements broker.PerMerchant: each merchant has its own
// refresh token, so merchants never share an access token.
func (s *RefreshToken) PerMerchant() bool { return true }

// SetRefreshToken stores a merchant's refresh token under the merchant's
// lock, and clears its ConsentStatus.ConsentRequiredSince. A refresh token
// RFC 6749 does not allow fails with ErrInvalidRefreshToken.
func (s *RefreshToken) SetRefreshToken(ctx context.Context, merchant string, rt broker.Secret) error {
	if !validRefreshToken(rt.Reveal()) {
		return fmt.Errorf("%w: it is "+invalidRefreshToken, ErrInvalidRefreshToken, broker.MaxTokenBytes>>10)
	}
	key := s.StoreKey(merchant)
	unlock, err := s.store.Lock(ctx, key)
	if err != nil {
		return fmt.Errorf("merchant %q: locking the refresh token: %w", merchant, err)
	}
	defer unlock()
	if err := s.store.Save(ctx, key, rt); err != nil {
		return fmt.Errorf("merchant %q: saving the refresh token: %w", merchant, err)
	}
	s.mu.Lock()
	delete(s.pending, key)
	delete(s.last, key)
	if st, ok := s.status[merchant]; ok {
		st.ConsentRequiredSince = time.Time{}
		s.status[merchant] = st
	}
	s.mu.Unlock()
	return nil
}

// Token refreshes an access token for req.Merchant under the merchant's
// lock, saving a rotated refresh token before it returns the access token.
// The refresh runs in a goroutine of its own: when ctx ends first, Token
// returns at once, and a request already sent still gets its answer and
// saves the rotated token (bounded by the client's timeout and
// SaveTimeout). A call that waited on the lock while another refreshed for
// the same scopes and audience gets that call's access token.
func (s *RefreshToken) Token(ctx context.Context, req broker.Request) (broker.Token, error) {
	key := s.StoreKey(req.Merchant)
	s.mu.Lock()
	before, closed := s.last[key], s.closing.Err() != nil
	if !closed {
		s.running++
	}
	s.mu.Unlock()
	if closed {
		return broker.Token{}, fmt.Errorf("merchant %q: %w", req.Merchant, ErrClosed)
	}

	lctx, cancel := context.WithCancelCause(ctx)
	stop := context.AfterFunc(s.closing, func() { cancel(ErrClosed) })
	unlock, err := s.store.Lock(lctx, key)
	stop()
	if errors.Is(context.Cause(lctx), ErrClosed) && err != nil {
		err = ErrClosed
	}
	cancel(nil)
	if err != nil {
		s.ended()
		return broker.Token{}, fmt.Errorf("merchant %q: locking the refresh token: %w", req.Merchant, err)
	}
	type answer struct {
		tok broker.Token
		err error
	}
	// Unbuffered: when Token has returned, the access token is marked
	// abandoned for the next call instead.
	done := make(chan answer)
	go func() {
		defer s.ended()
		tok, minted, err := s.refreshLocked(ctx, req, key, before)
		// Noted under the lock: a SetRefreshToken after it has the last word.
		s.note(req.Merchant, err)
		unlock()
		select {
		case done <- answer{tok, err}:
		case <-ctx.Done():
			if minted {
				s.mu.Lock()
				if l := s.last[key]; l != nil && l.tok.Value == tok.Value {
					l.abandoned = true
				}
				s.mu.Unlock()
			}
		}
	}()
	select {
	case a := <-done:
		return a.tok, a.err
	case <-ctx.Done():
		return broker.Token{}, fmt.Errorf("merchant %q: refreshing the access token: %w", req.Merchant, context.Cause(ctx))
	}
}

// refreshLocked is Token's work under the merchant's lock: the access
// token another call refreshed since before, or abandoned, else a refresh
// (minted), started only while ctx lasts and the source is open.
func (s *RefreshToken) refreshLocked(ctx context.Context, req broker.Request, key string, before *refreshed) (_ broker.Token, minted bool, _ error) {
	want := strings.Join(req.Scopes, " ") + "\x00" + req.Audience
	s.mu.Lock()
	l, pending, closed := s.last[key], s.pending[key], s.closing.Err() != nil
	reuse := l != nil && (l != before || l.abandoned) && l.req == want && l.tok.Expiry.After(s.cfg.Now())
	if reuse {
		l.abandoned = false
	}
	s.mu.Unlock()
	if reuse {
		return l.tok, false, nil
	}
	if closed {
		return broker.Token{}, false, fmt.Errorf("merchant %q: %w", req.Merchant, ErrClosed)
	}

	rt, err := s.loadLocked(ctx, key)
	if errors.Is(err, ErrNoRefreshToken) {
		rt, err = "", nil
	} else if err != nil {
		return broker.Token{}, false, fmt.Errorf("merchant %q: loading the refresh token: %w", req.Merchant, err)
	}
	if pending.rt != "" {
		if rt, err = s.unsavedOrStored(ctx, key, rt, pending); err != nil {
			return broker.Token{}, false, &SaveError{Merchant: req.Merchant, Err: err}
		}
	}
	if rt == "" {
		return broker.Token{}, false, &ConsentRequiredError{Provider: s.cfg.Name, Merchant: req.Merchant, Err: ErrNoRefreshToken}
	}
	if err := ctx.Err(); err != nil {
		return broker.Token{}, false, fmt.Errorf("merchant %q: refreshing the access token: %w", req.Merchant, context.Cause(ctx))
	}

	// Once sent, the refresh outlives ctx: a provider that rotates the
	// refresh token has spent the old one, and only its answer has the new.
	rctx, cancel := detached(ctx)
	defer cancel()
	grant := url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt.Reveal()}}
	tok, raw, err := s.exchange(rctx, req, grant, rt.Reveal())
	// A different refresh_token in the answer is a rotation: saved even
	// when the access token beside it is refused.
	if raw != nil && raw.RefreshToken != "" && broker.Secret(raw.RefreshToken) != rt {
		next := broker.Secret(raw.RefreshToken)
		if !validRefreshToken(raw.RefreshToken) {
			return broker.Token{}, false, &broker.APIError{Provider: ProviderName, StatusCode: 200, Code: "invalid_refresh_token",
				Description: fmt.Sprintf("the rotated refresh token is "+invalidRefreshToken, broker.MaxTokenBytes>>10)}
		}
		if err := s.save(ctx, key, next, rt); err != nil {
			return broker.Token{}, false, &SaveError{Merchant: req.Merchant, Err: err}
		}
	}
	if err != nil {
		var ae *broker.APIError
		if errors.As(err, &ae) && ae.Code == "invalid_grant" {
			return broker.Token{}, false, &ConsentRequiredError{Provider: s.cfg.Name, Merchant: req.Merchant, Err: ae}
		}
		return broker.Token{}, false, err
	}
	s.mu.Lock()
	s.last[key] = &refreshed{req: want, tok: tok}
	if s.sweep--; s.sweep <= 0 {
		s.sweep = sweepEvery
		now := s.cfg.Now()
		for k, l := range s.last {
			if !l.tok.Expiry.After(now) {
				delete(s.last, k)
			}
		}
	}
	s.mu.Unlock()
	return tok, true, nil
}

// ErrInvalidRefreshToken is returned by SetRefreshToken for a refresh
// token RFC 6749 does not allow or longer than broker.MaxTokenBytes.
var ErrInvalidRefreshToken = errors.New("invalid refresh token")

// invalidRefreshToken says what validRefreshToken refuses, a format of
// broker.MaxTokenBytes in KiB.
const invalidRefreshToken = "empty, longer than %d KiB, or contains characters not allowed in a refresh token (RFC 6749: printable ASCII and space)"

// validRefreshToken reports whether rt is 1*VSCHAR (printable ASCII and
// space, RFC 6749 Appendix A.17) of at most broker.MaxTokenBytes. It only
// goes into a form body, so a space is allowed, at either end too.
func validRefreshToken(rt string) bool {
	return rt != "" && len(rt) <= broker.MaxTokenBytes &&
		!strings.ContainsFunc(rt, func(r rune) bool { return r < ' ' || r > '~' })
}

// loadLocked loads the refresh token of key, whose lock the caller holds:
// with the store's LoadLocked when it has one, else with Load.
func (s *RefreshToken) loadLocked(ctx context.Context, key string) (broker.Secret, error) {
	if ll, ok := s.store.(LockedLoader); ok {
		return ll.LoadLocked(ctx, key)
	}
	return s.store.Load(ctx, key)
}

// unsavedOrStored returns the refresh token of key to send, given stored,
// what the store holds ("" for none), and p, the rotated token whose save
// failed: p.rt, saved first, when the store still holds the token p.rt
// replaced, or p.rt itself; else stored, and p is dropped, so that a token
// saved or deleted elsewhere is never overwritten by one spent since.
func (s *RefreshToken) unsavedOrStored(ctx context.Context, key string, stored broker.Secret, p unsaved) (broker.Secret, error) {
	switch stored {
	case p.replaced:
		return p.rt, s.save(ctx, key, p.rt, p.replaced)
	case p.rt:
	default:
		s.cfg.Logger.Warn("a rotated refresh token whose save had failed is dropped: the store holds another one (saved elsewhere since) or none (deleted)",
			zap.String("provider", s.cfg.Name), zap.String("store_key", key))
	}
	s.mu.Lock()
	delete(s.pending, key)
	s.mu.Unlock()
	return stored, nil
}

// save stores rt, a rotated refresh token that replaced replaced, also
// when ctx is cancelled; on failure rt is kept in pending.
func (s *RefreshToken) save(ctx context.Context, key string, rt, replaced broker.Secret) error {
	sctx, cancel := detached(ctx)
	defer cancel()
	err := s.store.Save(sctx, key, rt)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.pending[key] = unsaved{rt: rt, replaced: replaced}
		return err
	}
	delete(s.pending, key)
	return nil
}

var (
	_ broker.Source      = (*RefreshToken)(nil)
	_ broker.Revoker     = (*RefreshToken)(nil)
	_ broker.Classifier  = (*RefreshToken)(nil)
	_ broker.DPoPBound   = (*RefreshToken)(nil)
	_ broker.CallBounded = (*RefreshToken)(nil)
)
