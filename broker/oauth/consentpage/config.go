package consentpage

import (
	"encoding/base64"
	"errors"
	"fmt"
	"math"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"golang.org/x/text/language"

	"github.com/tokenbroker/caddy-token-broker/internal/scrub"
)

// Config brands the pages. The zero value gives the built-in pages,
// unbranded, in the browser's language.
type Config struct {
	// Partner is the partner's name, shown in the header and the texts
	// ("ask Acme Payments for a new consent link"). At most 100
	// characters, no control characters. Optional.
	Partner string
	// Logo is the partner's logo, shown in the header: a data: URI of a
	// PNG, JPEG, GIF, WebP or SVG image, base64-encoded, at most 64 KiB
	// ("data:image/svg+xml;base64,…"), or an absolute path on the consent
	// site ("/brand/logo.svg", which the operator serves, e.g. with
	// file_server). Nothing is loaded from another origin: a URL with a
	// scheme or host other than data: is refused. Optional.
	Logo string
	// Accent is the accent colour (header rule, success icon), a CSS hex
	// colour "#rgb" or "#rrggbb". Default "#1f5fbf". The icon's text is
	// white or black, whichever contrasts more.
	Accent string
	// Lang fixes the pages' language, one of Languages ("en", "de",
	// "fr"). Default: the best match of the browser's Accept-Language,
	// else "en".
	Lang string
	// Templates is a directory of html/template files replacing the
	// built-in pages: page.html for every page, or <page>.html (e.g.
	// success.html, not_found.html) for one page; files whose name starts
	// with "_" hold shared {{define}}d templates. Every .html file of the
	// directory is parsed together; another .html name is refused (a
	// misspelt page). Optional.
	Templates string
}

// DefaultAccent is the accent colour when none is configured.
const DefaultAccent = "#1f5fbf"

// MaxLogo is the largest data: URI logo, in bytes.
const MaxLogo = 64 << 10

// Languages are the languages of the built-in texts; the first is the
// default.
func Languages() []string { return []string{"en", "de", "fr"} }

var (
	hexColour = regexp.MustCompile(`^#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})$`)
	dataLogo  = regexp.MustCompile(`^data:image/(?:png|jpeg|gif|webp|svg\+xml);base64,([A-Za-z0-9+/]+={0,2})$`)
	matcher   = language.NewMatcher([]language.Tag{language.English, language.German, language.French})
)

// CheckName checks a name shown on the consent pages (the partner's, a
// provider's or a merchant's display name): at most 100 characters of
// valid UTF-8, without control characters or surrounding spaces. The
// empty name passes.
func CheckName(s string) error {
	if utf8.RuneCountInString(s) > 100 || !utf8.ValidString(s) ||
		strings.ContainsFunc(s, unicode.IsControl) || s != strings.TrimSpace(s) {
		return errors.New("use at most 100 characters, without control characters or surrounding spaces")
	}
	return nil
}

// check validates the configuration; each error names its option.
func (c *Config) check() error {
	var errs []error
	if err := CheckName(c.Partner); err != nil {
		errs = append(errs, fmt.Errorf("partner %q: %w", truncate(c.Partner), err))
	}
	if c.Logo != "" {
		if err := checkLogo(c.Logo); err != nil {
			errs = append(errs, err)
		}
	}
	if c.Accent != "" && !hexColour.MatchString(c.Accent) {
		errs = append(errs, fmt.Errorf("accent %q is not a CSS hex colour: use #rgb or #rrggbb, e.g. #1f5fbf", truncate(c.Accent)))
	}
	if c.Lang != "" && languages[c.Lang] == nil {
		errs = append(errs, fmt.Errorf("lang %q has no built-in texts: use one of %s, or leave it out to follow the browser's Accept-Language", truncate(c.Lang), strings.Join(Languages(), ", ")))
	}
	return errors.Join(errs...)
}

// checkLogo accepts a data: URI image or an absolute path on the site.
func checkLogo(logo string) error {
	if strings.HasPrefix(strings.ToLower(logo), "data:") {
		m := dataLogo.FindStringSubmatch(logo)
		switch {
		case len(logo) > MaxLogo:
			return fmt.Errorf("logo: the data: URI has %d bytes, more than %d: use a smaller image or a path on the consent site", len(logo), MaxLogo)
		case m == nil:
			return errors.New("logo: a data: URI must be data:image/png|jpeg|gif|webp|svg+xml;base64,<base64>")
		}
		if _, err := base64.StdEncoding.DecodeString(m[1]); err != nil {
			return fmt.Errorf("logo: the data: URI's base64 does not decode: %v", err)
		}
		return nil
	}
	u, err := url.Parse(logo)
	if err != nil || u.Scheme != "" || u.Host != "" || !strings.HasPrefix(logo, "/") || strings.HasPrefix(logo, "//") ||
		strings.ContainsAny(logo, "\\\"'<> ") || strings.ContainsFunc(logo, unicode.IsControl) {
		return fmt.Errorf("logo %q: use a data: URI or an absolute path on the consent site (/brand/logo.svg): the pages load nothing from other origins", truncate(logo))
	}
	return nil
}

// truncate shortens a configured value for an error message.
func truncate(s string) string { return scrub.Truncate(s, 80) }

// accent is the configured accent colour or the default.
func (c *Config) accent() string {
	if c.Accent == "" {
		return DefaultAccent
	}
	return strings.ToLower(c.Accent)
}

// onAccent is the text colour on the accent: white or black, whichever
// has the higher WCAG contrast ratio with it.
func onAccent(hex string) string {
	h := strings.TrimPrefix(hex, "#")
	if len(h) == 3 {
		h = string([]byte{h[0], h[0], h[1], h[1], h[2], h[2]})
	}
	var lum float64
	for i, w := range []float64{0.2126, 0.7152, 0.0722} {
		v, _ := strconv.ParseUint(h[2*i:2*i+2], 16, 8)
		c := float64(v) / 255
		if c <= 0.04045 {
			c /= 12.92
		} else {
			c = math.Pow((c+0.055)/1.055, 2.4)
		}
		lum += w * c
	}
	// Contrast with white (1.05/(lum+0.05)) against black ((lum+0.05)/0.05).
	if 1.05/(lum+0.05) >= (lum+0.05)/0.05 {
		return "#ffffff"
	}
	return "#000000"
}

// language is the page language: the configured one, else the best match
// of acceptLanguage, else the default.
func (r *Renderer) language(acceptLanguage string) string {
	if r.cfg.Lang != "" {
		return r.cfg.Lang
	}
	tags, _, err := language.ParseAcceptLanguage(acceptLanguage)
	if err != nil || len(tags) == 0 {
		return Languages()[0]
	}
	_, i, conf := matcher.Match(tags...)
	if conf == language.No {
		return Languages()[0]
	}
	return Languages()[i]
}
