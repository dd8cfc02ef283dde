package config

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/budget"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
)

// Limits on the files a registry names.
const (
	maxSecretFile = 64 << 10
	maxTLSFile    = 1 << 20
	maxTimeout    = 5 * time.Minute
	defTimeout    = 10 * time.Second
	defLifetime   = time.Hour
)

// entry records the problems of one provider or merchant.
type entry struct {
	p       *parser
	section string // "providers" or "merchants"
	name    string
	bad     bool
	secrets *fingerprint // HMAC of the resolved secret values (secretversion.go)
}

func (p *parser) entry(section, name string) *entry {
	return &entry{p: p, section: section, name: name}
}

// errf records a problem with field ("" for the entry as a whole).
func (e *entry) errf(field, format string, args ...any) {
	e.bad = true
	key := []string{e.section, e.name}
	if field != "" {
		key = append(key, strings.Split(field, ".")...)
	}
	e.p.problem(key, fmt.Sprintf(format, args...))
}

// decode decodes the entry's table into v; false when it could not.
func (e *entry) decode(md *toml.MetaData, prim toml.Primitive, v any) bool {
	if t := typeOf(md, e.section, e.name); t != "Hash" {
		e.errf("", "must be a table, not %s", typeName(t))
		return false
	}
	if err := md.PrimitiveDecode(prim, v); err != nil {
		e.bad = true
		e.p.decodeError(err, false)
		return false
	}
	return true
}

// envRef matches {env.NAME} references; envName is a valid NAME.
var (
	envRef  = regexp.MustCompile(`\{env\.([^{}]*)\}`)
	envName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
)

// expand replaces the {env.NAME} references of a non-secret value; false
// when one could not be resolved (and was reported).
func (e *entry) expand(field, s string) (string, bool) {
	if !strings.Contains(s, "{env.") {
		return s, true
	}
	ok := true
	s = envRef.ReplaceAllStringFunc(s, func(ref string) string {
		name := ref[len("{env.") : len(ref)-1]
		if !envName.MatchString(name) {
			e.errf(field, "%q is not a valid environment variable reference {env.NAME}", ref)
			ok = false
			return ""
		}
		v, set := e.p.lookupEnv(name)
		if !set {
			e.errf(field, "environment variable %s is not set", name)
			ok = false
		}
		return v
	})
	return s, ok
}

// secret resolves a secret reference, {env.NAME} or {file.PATH}. Messages
// name the variable or the file, never the value. The value never goes
// into the provider ID.
func (e *entry) secret(field, ref string) broker.Secret {
	const use = "use a reference, {env.NAME} or {file.PATH}"
	var v string
	if name, ok := cut(ref, "{env.", "}"); ok {
		var set bool
		switch v, set = e.p.lookupEnv(name); {
		case !envName.MatchString(name):
			e.errf(field, "the reference names an invalid environment variable: %s", use)
		case !set:
			e.errf(field, "environment variable %s is not set", name)
		case v == "":
			e.errf(field, "environment variable %s is empty", name)
		}
	} else if path, ok := cut(ref, "{file.", "}"); ok && path != "" {
		path = e.p.abs(path)
		b, err := e.p.readFile(path, maxSecretFile)
		v = strings.TrimRight(string(b), "\r\n")
		switch {
		case err != nil:
			e.errf(field, "cannot read the secret file: %v", err)
		case v == "":
			e.errf(field, "secret file %s is empty", path)
		}
	} else if ref == "" {
		e.errf(field, "missing: %s", use)
	} else {
		e.errf(field, "holds a clear-text value (not shown): %s", use)
	}
	e.addSecret(field, v)
	return broker.Secret(v)
}

// pemPath expands the path of a PEM file (private_key, the tls files,
// dpop.key) and resolves it against the registry file's folder; shown is
// how messages name it (shownPath). PEM text in the value is refused
// without being shown (it may be a private key), with hint, the field's
// other ways to give it. ok is false when the value was refused or a
// reference could not be resolved.
func (e *entry) pemPath(field, raw, hint string) (path, shown string, ok bool) {
	path, ok = e.expand(field, raw)
	if strings.Contains(path, "-----BEGIN") {
		e.errf(field, "holds PEM text in clear (not shown): keep it in a file (readable only by the broker when it holds a private key) and name its path%s", hint)
		return "", "", false
	}
	path = e.p.abs(path)
	return path, shownPath(raw, path), ok
}

// maxShownPath is the length of the longest path messages show: a PEM
// private key in base64 is longer (an Ed25519 key, the shortest, takes
// 160 characters).
const maxShownPath = 128

// shownPath is how messages name the file of a PEM field, written raw in
// the registry and resolved to path. The field may hold a private key in
// base64 by mistake (as a Kubernetes secret keeps it), so a message names
// the path only where it cannot be key material (plainPath): path when
// raw is literal and plain, raw as written when the text around its
// {env.NAME} references is empty or plain; else no name.
func shownPath(raw, path string) string {
	around := envRef.ReplaceAllString(raw, "")
	switch {
	case around == raw && plainPath(raw):
		return path
	case around != raw && (around == "" || plainPath(around)):
		return raw
	}
	return "the file it names (not shown: it may be key material)"
}

// plainPath reports whether s reads as a path, not as key material (see
// shownPath).
func plainPath(s string) bool {
	_, err := base64.StdEncoding.DecodeString(s)
	return err != nil && len(s) <= maxShownPath && strings.ContainsAny(s, "/."+string(filepath.Separator))
}

// readPEM reads the file of a PEM field (pemPath). A failure names the
// file as shown, and its error leaves out the path (key material maybe).
func (e *entry) readPEM(field, path, shown string, max int64) ([]byte, bool) {
	b, err := e.p.readFile(path, max)
	if err != nil {
		if pe := (*fs.PathError)(nil); errors.As(err, &pe) {
			err = pe.Err
		}
		e.errf(field, "cannot read %s: %v", shown, err)
		return nil, false
	}
	return b, true
}

// cut returns what is between prefix and suffix when s is exactly that.
func cut(s, prefix, suffix string) (string, bool) {
	if len(s) < len(prefix)+len(suffix) || !strings.HasPrefix(s, prefix) || !strings.HasSuffix(s, suffix) {
		return "", false
	}
	return s[len(prefix) : len(s)-len(suffix)], true
}

// abs resolves a path against the registry file's folder.
func (p *parser) abs(path string) string {
	if path == "" || filepath.IsAbs(path) {
		return path
	}
	return filepath.Join(p.dir, path)
}

// readFile reads a regular file of at most max bytes. Devices and pipes
// are refused: reading one could block or never end.
func readFile(path string, max int64) ([]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, &fs.PathError{Op: "read", Path: path, Err: errors.New("not a regular file")}
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err == nil && int64(len(b)) > max {
		err = &fs.PathError{Op: "read", Path: path, Err: fmt.Errorf("larger than %d bytes", max)}
	}
	return b, err
}

// fingerprint hashes named values: a provider's registry path (cleaned)
// and the non-secret part of its resolved configuration into its ID
// (never a secret, nor anything derived from one: a private key
// contributes its public key, a TLS client certificate its bytes, the
// client key nothing), and its secret values into its SecretVersion
// (secretversion.go).
type fingerprint struct{ h hash.Hash }

// add feeds one named value, length-prefixed.
func (f *fingerprint) add(name string, value any) {
	s := fmt.Sprint(value)
	fmt.Fprintf(f.h, "%d:%s=%d:", len(name), name, len(s))
	io.WriteString(f.h, s)
}

// duration checks an optional duration against [min, max].
func (e *entry) duration(field string, d *Duration, def, min, max time.Duration) time.Duration {
	if d == nil {
		return def
	}
	v := time.Duration(*d)
	switch {
	case v <= 0:
		e.errf(field, "%s is out of range: must be positive", v)
	case v > max && min <= time.Nanosecond:
		e.errf(field, "%s is out of range: at most %s", v, max)
	case v < min || v > max:
		e.errf(field, "%s is out of range %s..%s", v, min, max)
	}
	return v
}

// rateLimit checks rate_limit and rate_burst (from 1 to one second's worth
// of the rate, its default); the zero Limit when rate_limit is unset.
func (e *entry) rateLimit(rate string, burst *int) budget.Limit {
	if rate == "" {
		if burst != nil {
			e.errf("rate_burst", "needs rate_limit: set the provider's token-request limit, e.g. rate_limit = \"20/s\"")
		}
		return budget.Limit{}
	}
	l, err := budget.ParseRate(rate)
	if err != nil {
		e.errf("rate_limit", "%v", err)
		return budget.Limit{}
	}
	if burst != nil {
		// ParseRate's burst is one second's worth of the rate, the most
		// a provider counting its limit over time accepts at once.
		if *burst < 1 || *burst > l.Burst {
			e.errf("rate_burst", "%d is out of range 1..%d: at most one second's worth of rate_limit %q; lower rate_burst, or leave it out for %d", *burst, l.Burst, rate, l.Burst)
			return budget.Limit{}
		}
		l.Burst = *burst
	}
	return l
}

// rawProvider is a [providers.NAME] table as decoded by ParseFile; Merge
// resolves it.
type rawProvider struct {
	name string
	line int
	bad  bool // a problem was reported by ParseFile
	ok   bool // decoded
	raw  providerTOML
}

// typ is the provider's type as far as it could be read.
func (rp *rawProvider) typ() string {
	if !rp.ok {
		return ""
	}
	return rp.raw.Type
}

// rawProvider decodes a [providers.NAME] table.
func (p *parser) rawProvider(md *toml.MetaData, name string, prim toml.Primitive) *rawProvider {
	e := p.entry("providers", name)
	if !ValidMerchantID(name) {
		e.errf("", "invalid provider name: use %s", errcode.MerchantIDGrammar)
	}
	rp := &rawProvider{name: name, line: p.line("providers", name)}
	rp.ok = e.decode(md, prim, &rp.raw)
	rp.bad = e.bad
	return rp
}

// provider resolves a decoded [providers.NAME] table; nil if it has
// problems.
func (p *parser) provider(rp *rawProvider) *Provider {
	if !rp.ok {
		return nil
	}
	name := rp.name
	e := p.entry("providers", name)
	e.bad = rp.bad
	raw := rp.raw
	var pt *providerType
	if t, ok := providerTypes[raw.Type]; ok {
		pt = &t
	} else if raw.Type == "" {
		e.errf("type", "missing: set it to one of %s", typeNames())
	} else {
		e.errf("type", "unknown provider type %q (known: %s)", raw.Type, typeNames())
	}
	fp := &fingerprint{sha256.New()}
	fp.add("registry", filepath.Clean(e.p.registry)) // as written, links not followed: a ConfigMap's update swaps its ..data link
	fp.add("type", raw.Type)
	pv := &Provider{Name: name, Type: raw.Type, Line: rp.line}

	timeout := e.duration("timeout", raw.Timeout, defTimeout, time.Nanosecond, maxTimeout)
	fp.add("timeout", timeout)
	pv.RateLimit = e.rateLimit(raw.RateLimit, raw.RateBurst) // not in the ID: a new budget keeps the cached tokens

	pv.client = e.client(raw.TLS, timeout, pv, fp)
	if pt == nil {
		return nil
	}
	pv.Source = pt.build(e, &raw, pv, fp)
	if e.bad {
		return nil
	}
	pv.ID = name + "#" + hex.EncodeToString(fp.h.Sum(nil))[:12]
	pv.SecretVersion = e.secretVersion()
	return pv
}

// client resolves the TLS options, feeds the server name and the bytes of
// the certificate files (never the key's) to fp, sets pv.certFile and
// returns the provider's HTTP client (nil on problems). Paths are left out
// of the ID: hosts of a fleet may keep the same files in other folders.
func (e *entry) client(raw *tlsTOML, timeout time.Duration, pv *Provider, fp *fingerprint) *http.Client {
	if raw == nil {
		raw = &tlsTOML{}
	}
	problems, unresolved := len(e.p.errs), false
	o := &httpclient.TLSOptions{}
	o.ServerName, _ = e.expand("tls.server_name", raw.ServerName)
	fp.add("tls.server_name", o.ServerName)
	for _, f := range []struct {
		field string
		raw   string
		path  *string
	}{
		{"tls.client_cert", raw.ClientCert, &o.CertFile},
		{"tls.client_key", raw.ClientKey, &o.KeyFile},
		{"tls.ca_file", raw.CAFile, &o.CAFile},
	} {
		path, shown, ok := e.pemPath(f.field, f.raw, "")
		*f.path, unresolved = path, unresolved || !ok
		if *f.path == "" || !ok {
			continue
		}
		b, _ := e.readPEM(f.field, path, shown, maxTLSFile)
		if f.field != "tls.client_key" {
			fp.add(f.field+".content", string(b))
		}
	}
	switch {
	case unresolved: // a path is at fault already: its pair is not the problem
	case o.CertFile != "" && o.KeyFile == "":
		e.errf("tls.client_key", "missing: client_cert needs its client_key")
	case o.CertFile == "" && o.KeyFile != "":
		e.errf("tls.client_cert", "missing: client_key needs its client_cert")
	}
	pv.certFile = o.CertFile
	if len(e.p.errs) > problems {
		return nil
	}
	c, err := httpclient.New(timeout, *o)
	if err != nil {
		e.errf("tls", "%v", err)
	}
	return c
}

// Problems of a merchant found by ParseFile, which Merge needs.
const (
	merchantBad       = 1 << iota // a problem was reported
	merchantUndecoded             // the table could not be decoded: nothing more to check
	merchantOrgFailed             // the organisation's references could not be expanded
)

// merchant decodes a [merchants.ID] table into table (raw, or the
// wildcardTOML that embeds it) and resolves what raw says by itself; the
// checks against its provider, maybe of another file, are checkMerchant's.
func (p *parser) merchant(md *toml.MetaData, id string, prim toml.Primitive, table any, raw *merchantTOML) (*entry, Merchant, uint8) {
	e := p.entry("merchants", id)
	if id != WildcardID && !ValidMerchantID(id) {
		e.errf("", "invalid merchant id: use %s", errcode.MerchantIDGrammar)
	}
	if !e.decode(md, prim, table) {
		return e, Merchant{ID: id, Terms: new(Terms)}, merchantBad | merchantUndecoded
	}
	m := Merchant{ID: id, Terms: &Terms{Provider: raw.Provider}, Line: p.line("merchants", id)}
	var flags uint8

	var ok bool
	m.Organisation, ok = e.expand("organisation", raw.Organisation)
	switch {
	case !ok:
		flags |= merchantOrgFailed
	case m.Organisation == "":
	case m.Organisation == "." || m.Organisation == "..":
		e.errf("organisation", "%q is not a valid organisation id", m.Organisation)
	case hasControl(m.Organisation):
		e.errf("organisation", "%q holds control characters", m.Organisation)
	}

	for i, s := range raw.Scopes {
		raw.Scopes[i], _ = e.expand("scopes", s)
	}
	m.Scopes = broker.NormaliseScopes(raw.Scopes)
	for _, s := range m.Scopes {
		if !validScope(s) {
			e.errf("scopes", "%q is not a valid scope (printable ASCII without spaces, quotes or backslashes)", s)
		}
	}

	if raw.TokenLifetime != nil {
		m.Lifetime = e.duration("token_lifetime", raw.TokenLifetime, 0, time.Nanosecond, time.Duration(1<<63-1))
	}

	m.Audience = e.plain("audience", raw.Audience)
	m.DisplayName = e.displayName("display_name", raw.DisplayName)
	if m.DisplayName != "" && id == WildcardID {
		e.errf("display_name", "is per merchant: give it on the merchants' own tables, not on the wildcard entry")
	}
	if e.bad {
		flags |= merchantBad
	}
	return e, m, flags
}

// checkMerchant checks a merchant against its provider; false if it has
// problems (flags are merchant's).
func (p *parser) checkMerchant(m *Merchant, flags uint8, defined map[string]string) bool {
	if flags&merchantUndecoded != 0 {
		return false
	}
	e := p.entry("merchants", m.ID)
	e.bad = flags&merchantBad != 0
	typ, known := defined[m.Provider]
	var pt *providerType
	if t, ok := providerTypes[typ]; ok {
		pt = &t
	}
	switch {
	case m.Provider == "":
		e.errf("provider", "missing (defined: %s)", definedNames(defined))
	case !known:
		e.errf("provider", "unknown provider %q (defined: %s)", m.Provider, definedNames(defined))
	}
	if flags&merchantOrgFailed == 0 && m.Organisation == "" && (pt == nil || pt.needsOrganisation) {
		e.errf("organisation", "missing: set the provider's id of the merchant's organisation")
	}
	if len(m.Scopes) == 0 && pt != nil && pt.needsScopes {
		e.errf("scopes", "missing: provider %q (type %s) needs at least one scope", m.Provider, typ)
	}
	if m.Lifetime > 0 && pt != nil {
		d := Duration(m.Lifetime)
		e.duration("token_lifetime", &d, 0, pt.minLifetime, pt.maxLifetime)
	}
	return !e.bad
}

func definedNames(defined map[string]string) string {
	if len(defined) == 0 {
		return "none: add a [providers.NAME] table"
	}
	return strings.Join(slices.Sorted(maps.Keys(defined)), ", ")
}

// typeOf is md.Type of key, "Hash" for a table that only dotted keys
// define (providers.p.type = "nuapay"), to which BurntSushi gives no type.
func typeOf(md *toml.MetaData, key ...string) string {
	if t := md.Type(key...); t != "" || !md.IsDefined(key...) {
		return t
	}
	return "Hash"
}

// typeName names a TOML type (MetaData.Type) in messages.
func typeName(t string) string {
	switch t {
	case "":
		return "nothing"
	case "Hash":
		return "a table"
	case "ArrayHash":
		return "an array of tables"
	}
	return strings.ToLower(t)
}

func hasControl(s string) bool {
	return strings.ContainsFunc(s, func(r rune) bool { return r < ' ' || r == 0x7f || r >= 0x80 && r < 0xa0 })
}
