package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// splitLayout is the split registry of the reload case (issue 9: "reload
// after editing one of 10 files of 10 000 merchants"): a folder holding
// 00-providers.toml and files merchant files of perFile merchants each,
// merchant i (merchantID, organisation orgID(i)) in file i/perFile. The
// edit touches only the last file: its first merchant gets a new
// organisation (orgID(total)) and a merchant is added (merchantID(total),
// organisation orgID(total+1)); the token API must know total+2
// organisations.
type splitLayout struct {
	files, perFile int
}

// splitWarmPerFile is how many merchants of each unchanged file are warmed
// before the reload; their token requests after it must be 0.
const splitWarmPerFile = 16

func (l splitLayout) validate() error {
	if l.files < 2 || l.perFile < 2 {
		return errors.New("flags: want -split-files >= 2 (one edited, at least one unchanged) and -split-merchants >= 2, or -split-files 0 to skip the split reload")
	}
	if l.files*l.perFile+2 > 9_999_999 {
		return fmt.Errorf("flags: -split-files %d × -split-merchants %d is more than 9 999 997 merchants", l.files, l.perFile)
	}
	return nil
}

// total is the merchant count before the edit.
func (l splitLayout) total() int { return l.files * l.perFile }

// orgs is how many organisations the token API needs for the layout.
func (l splitLayout) orgs() int { return l.total() + 2 }

// providersFile is the name of the file holding the provider.
const providersFile = "00-providers.toml"

// fileName is the name of merchant file f (sorted after providersFile).
func (l splitLayout) fileName(f int) string { return fmt.Sprintf("merchants-%03d.toml", f) }

// edited is the index of the file the edit changes.
func (l splitLayout) edited() int { return l.files - 1 }

// editedMerchant is the merchant whose organisation the edit changes;
// addedMerchant the merchant the edit adds.
func (l splitLayout) editedMerchant() int { return l.edited() * l.perFile }
func (l splitLayout) addedMerchant() int  { return l.total() }

// fileTOML is merchant file f, after the edit when edited is true (only
// the edited file differs).
func (l splitLayout) fileTOML(f int, edited bool) string {
	var b strings.Builder
	b.Grow(l.perFile*90 + 200)
	edited = edited && f == l.edited()
	if edited {
		fmt.Fprintf(&b, "# edited by the bench: %s moved to %s, %s added\n\n",
			merchantID(l.editedMerchant()), orgID(l.total()), merchantID(l.addedMerchant()))
	}
	for i := f * l.perFile; i < (f+1)*l.perFile; i++ {
		org := orgID(i)
		if edited && i == l.editedMerchant() {
			org = orgID(l.total())
		}
		merchantTOML(&b, merchantID(i), org)
	}
	if edited {
		merchantTOML(&b, merchantID(l.addedMerchant()), orgID(l.total()+1))
	}
	return b.String()
}

// write writes the registry, before the edit, into dir.
func (l splitLayout) write(dir, tokenAPI string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, providersFile), []byte(providersTOML(tokenAPI)), 0o644); err != nil {
		return err
	}
	for f := range l.files {
		if err := os.WriteFile(filepath.Join(dir, l.fileName(f)), []byte(l.fileTOML(f, false)), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// edit replaces the edited file in dir by its edited form, atomically (a
// temporary file starting with "." is not part of the registry, then a
// rename), as an editor or a deployment would.
func (l splitLayout) edit(dir string) error {
	tmp := filepath.Join(dir, ".edit.tmp")
	if err := os.WriteFile(tmp, []byte(l.fileTOML(l.edited(), true)), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, l.fileName(l.edited())))
}

// warmed are the merchants whose entries the edit does not change that
// are warmed before the reload: splitWarmPerFile spread over each
// unchanged file, and the second merchant of the edited file (an
// unchanged entry in a changed file).
func (l splitLayout) warmed() []string {
	per := min(splitWarmPerFile, l.perFile)
	var ids []string
	for f := range l.files - 1 {
		for j := range per {
			ids = append(ids, merchantID(f*l.perFile+j*(l.perFile/per)))
		}
	}
	return append(ids, merchantID(l.editedMerchant()+1))
}

// splitResult is what the split reload case measured.
type splitResult struct {
	Files, PerFile      int
	Start               time.Duration
	RSSIdle             int64
	Reload              time.Duration // `caddy reload --force` after the edit
	RSSAfterReload      int64
	Warmed              int   // merchants of unchanged entries warmed before the reload
	ReloadTokens        int64 // token requests of the reload and one request per warmed merchant after it (want 0)
	EditTokens          int64 // token requests of one request each to the edited and the added merchant (want 2)
	EditedID, AddedID   string
	EditedOrg, AddedOrg string
	// MemIdle and MemAfterReload are the sidecar's Go runtime figures when
	// RSSIdle and RSSAfterReload were read.
	MemIdle, MemAfterReload memStats
}

// measureSplit runs the split reload case: a fresh sidecar on the split
// registry (the folder as `config`), warm-up of the merchants of
// l.warmed() and of the merchant to be edited, the edit of one file, then
// `caddy reload --force` timed, a request to each warmed merchant (all
// must answer 200 from cached tokens), and a request to the edited and the
// added merchant (200, one token request each: the edit took effect).
func (e *env) measureSplit(l splitLayout) (splitResult, error) {
	r := splitResult{Files: l.files, PerFile: l.perFile,
		EditedID: merchantID(l.editedMerchant()), AddedID: merchantID(l.addedMerchant()),
		EditedOrg: orgID(l.total()), AddedOrg: orgID(l.total() + 1)}
	dir := filepath.Join(e.dir, "split")
	if err := l.write(dir, e.tokenAPI); err != nil {
		return r, err
	}
	progress("split registry (%d files × %d merchants): start", l.files, l.perFile)
	side, err := e.startIdle("sidecar-split", dir, &r.Start, &r.RSSIdle, &r.MemIdle)
	if side != nil {
		defer side.p.stop()
	}
	if err != nil {
		return r, err
	}
	warmed := l.warmed()
	r.Warmed = len(warmed)
	byIndex := func(ids []string) func(int) string { return func(i int) string { return ids[i] } }
	before := append([]string{r.EditedID}, warmed...)
	if err := warm(side.url(), len(before), byIndex(before)); err != nil {
		return r, fmt.Errorf("before the edit: %w", err)
	}

	progress("split registry: edit %s, reload", l.fileName(l.edited()))
	if err := l.edit(dir); err != nil {
		return r, err
	}
	n0, err := e.tokenCount()
	if err != nil {
		return r, err
	}
	if r.Reload, err = e.reload(side); err != nil {
		return r, fmt.Errorf("after the edit: %w", err)
	}
	if r.RSSAfterReload, err = rss(side.p.pid()); err != nil {
		return r, err
	}
	if r.MemAfterReload, err = side.memStats(); err != nil {
		return r, err
	}
	if err := warm(side.url(), len(warmed), byIndex(warmed)); err != nil {
		return r, fmt.Errorf("after the reload, merchants of unchanged entries: %w", err)
	}
	n1, err := e.tokenCount()
	if err != nil {
		return r, err
	}
	r.ReloadTokens = n1 - n0
	edited := []string{r.EditedID, r.AddedID}
	if err := warm(side.url(), len(edited), byIndex(edited)); err != nil {
		return r, fmt.Errorf("after the reload, the edited and the added merchant: %w", err)
	}
	n2, err := e.tokenCount()
	if err != nil {
		return r, err
	}
	r.EditTokens = n2 - n1
	return r, nil
}
