package consentpage

// Text is the built-in wording of one page in one language, the names
// ({partner}, {merchant}, {bank}) filled in. Templates get it as
// Data.Text; a template may use it or say things its own way.
type Text struct {
	// Title is the page's title and main heading: what happened, in a
	// few words ("Consent given").
	Title string
	// About says whose consent it is ("Consent for Acme Ltd at Example
	// Bank"); empty when the merchant is not known (a link that did not
	// open).
	About string
	// Message says what happened.
	Message string
	// NextLabel is the heading over Next ("What now?").
	NextLabel string
	// Next says what to do now.
	Next string
	// Action is the label of the start page's button ("Continue to
	// Example Bank"); empty on every other page.
	Action string
	// CodeLabel labels Data.Code ("Reference:").
	CodeLabel string
	// Consent is the word shown in the header when no partner name is
	// configured ("Consent").
	Consent string
	// Footer is the page's footer line.
	Footer string
}

// pageText is the wording of one page.
type pageText struct{ title, message, next string }

// texts holds the built-in texts of one language.
type texts struct {
	// partner and bank stand in for a partner name or a bank display
	// name that is not configured.
	partner, bank                                string
	about, nextLabel, codeLabel, consent, footer string
	action                                       string
	pages                                        map[string]pageText
}

// languages are the built-in texts by language tag; Languages lists
// their tags, the first being the default.
var languages = map[string]*texts{
	"en": {
		partner:   "the service that sent you the link",
		bank:      "your bank",
		about:     "Consent for {merchant} at {bank}",
		nextLabel: "What now?",
		codeLabel: "Reference:",
		consent:   "Consent",
		footer:    "Your bank login happens on your bank's own site: this service never sees your password.",
		action:    "Continue to {bank}",
		pages: map[string]pageText{
			PageStart: {"Give your consent",
				"{partner} asks for your consent to access your account at {bank}. You log in and decide at {bank}'s own site.",
				"Press the button to continue to {bank}. The link works until you have given your consent, for a short time only."},
			PageSuccess: {"Consent given",
				"Thank you: your consent is recorded. The access you gave at {bank} is now available to {partner}.",
				"Nothing more to do: you can close this window."},
			PageDenied: {"Consent not given",
				"The consent was not given at {bank}, so nothing was shared.",
				"If you want to give your consent after all, open the consent link again soon, or ask {partner} for a new one."},
			PageExpired: {"This consent link has expired",
				"For your safety a consent link, and the time to finish at the bank, are short; this one has run out. Nothing was recorded.",
				"Ask {partner} for a new consent link and open it soon after you get it."},
			PageUsed: {"This consent link was already used",
				"A consent link works for one consent only, and this one has been used already, or it is not known here.",
				"If you did not finish your consent, ask {partner} for a new consent link."},
			PageMissing: {"The consent link is incomplete",
				"The address you opened does not hold a consent link.",
				"Open the whole link you were given (if it was split over two lines, copy it completely), or ask {partner} for a new one."},
			PageInvalid: {"This consent link is damaged",
				"The consent link in the address is garbled: part of it is missing or was changed.",
				"Open the whole link you were given (if it was split over two lines, copy it completely), or ask {partner} for a new one."},
			PageProviderError: {"The bank could not process this consent request",
				"This consent request could not be processed at {bank}. This is a configuration problem of the service, not a decision of yours; its operator has been told. Nothing was recorded.",
				"Please try again later with a new consent link from {partner}."},
			PageFailed: {"The consent could not be completed",
				"Something went wrong between this service and {bank}, and your consent was not recorded.",
				"Please ask {partner} for a new consent link and try again."},
			PageUnavailable: {"The consent service is unavailable",
				"This service cannot reach {bank} or its own storage right now, and your consent was not recorded.",
				"Please try again in a few minutes with a new consent link from {partner}."},
			PageRetryCallback: {"Your bank cannot be reached right now",
				"This service cannot reach {bank} right now to record your consent. Nothing is lost yet: the consent you gave at {bank} can still be recorded for a short while.",
				"Please reload this page in a moment."},
			PageCrossSite: {"Please open the consent link again",
				"This consent was started from another site, not from the button on the consent page. For your safety nothing was started.",
				"Open the consent link you were given and press its button. If this happens again, update your browser or use another one."},
			PageWrongBrowser: {"Please use the browser you started in",
				"This consent was started in another browser, or this browser did not keep its consent cookie. For your safety it was not completed here.",
				"Open the consent link you were given in this browser, with cookies allowed, or ask {partner} for a new one."},
			PageNotFound: {"Page not found",
				"There is no page at this address.",
				"To give your consent, open the consent link you were given."},
			PageGone: {"This page is no longer available",
				"The result of a consent is shown here for a limited time only.",
				"If you still need to give your consent, ask {partner} for a new consent link."},
			PageResultUnavailable: {"The result cannot be shown right now",
				"This service cannot read its storage right now, so it cannot show the result of your consent.",
				"Please reload this page in a moment."},
		},
	},
	"de": {
		partner:   "der Dienst, der Ihnen den Link geschickt hat",
		bank:      "Ihrer Bank",
		about:     "Einwilligung für {merchant} bei {bank}",
		nextLabel: "Wie geht es weiter?",
		codeLabel: "Referenz:",
		consent:   "Einwilligung",
		footer:    "Sie melden sich auf der Seite Ihrer Bank an: dieser Dienst sieht Ihr Passwort nie.",
		action:    "Weiter zu {bank}",
		pages: map[string]pageText{
			PageStart: {"Einwilligung erteilen",
				"{partner} bittet um Ihre Einwilligung für den Zugang zu Ihrem Konto bei {bank}. Sie melden sich auf der Seite von {bank} an und entscheiden dort.",
				"Klicken Sie auf die Schaltfläche, um zu {bank} zu gelangen. Der Link gilt nur kurz und nur, bis Sie eingewilligt haben."},
			PageSuccess: {"Einwilligung erteilt",
				"Vielen Dank: Ihre Einwilligung ist gespeichert. Der Zugang, den Sie bei {bank} erteilt haben, steht jetzt bereit.",
				"Sie müssen nichts weiter tun und können dieses Fenster schließen."},
			PageDenied: {"Einwilligung nicht erteilt",
				"Die Einwilligung wurde bei {bank} nicht erteilt; es wurde nichts weitergegeben.",
				"Wenn Sie doch einwilligen möchten, öffnen Sie den Einwilligungslink bald noch einmal oder fordern Sie einen neuen an."},
			PageExpired: {"Dieser Einwilligungslink ist abgelaufen",
				"Zu Ihrer Sicherheit gelten Einwilligungslinks und die Zeit für die Anmeldung bei der Bank nur kurz; diese Zeit ist abgelaufen. Es wurde nichts gespeichert.",
				"Fordern Sie einen neuen Einwilligungslink an und öffnen Sie ihn bald nach Erhalt."},
			PageUsed: {"Dieser Einwilligungslink wurde bereits verwendet",
				"Ein Einwilligungslink gilt nur für eine Einwilligung, und dieser wurde bereits verwendet oder ist hier nicht bekannt.",
				"Wenn Sie Ihre Einwilligung nicht abgeschlossen haben, fordern Sie einen neuen Einwilligungslink an."},
			PageMissing: {"Der Einwilligungslink ist unvollständig",
				"Die geöffnete Adresse enthält keinen Einwilligungslink.",
				"Öffnen Sie den vollständigen Link (wurde er auf zwei Zeilen umbrochen, kopieren Sie ihn ganz) oder fordern Sie einen neuen an."},
			PageInvalid: {"Dieser Einwilligungslink ist beschädigt",
				"Der Einwilligungslink in der Adresse ist unlesbar: ein Teil fehlt oder wurde verändert.",
				"Öffnen Sie den vollständigen Link (wurde er auf zwei Zeilen umbrochen, kopieren Sie ihn ganz) oder fordern Sie einen neuen an."},
			PageProviderError: {"Die Bank konnte diese Anfrage nicht bearbeiten",
				"Bei {bank} konnte diese Einwilligungsanfrage nicht bearbeitet werden. Das ist ein Konfigurationsproblem des Dienstes, keine Entscheidung von Ihnen; der Betreiber wurde benachrichtigt. Es wurde nichts gespeichert.",
				"Bitte versuchen Sie es später mit einem neuen Einwilligungslink erneut."},
			PageFailed: {"Die Einwilligung konnte nicht abgeschlossen werden",
				"Zwischen diesem Dienst und {bank} ist ein Fehler aufgetreten; Ihre Einwilligung wurde nicht gespeichert.",
				"Bitte fordern Sie einen neuen Einwilligungslink an und versuchen Sie es erneut."},
			PageUnavailable: {"Der Einwilligungsdienst ist nicht erreichbar",
				"Dieser Dienst hat gerade keine Verbindung zu {bank} oder zu seinem Speicher; Ihre Einwilligung wurde nicht gespeichert.",
				"Bitte versuchen Sie es in einigen Minuten mit einem neuen Einwilligungslink erneut."},
			PageRetryCallback: {"Ihre Bank ist gerade nicht erreichbar",
				"Dieser Dienst hat gerade keine Verbindung zu {bank}, um Ihre Einwilligung zu speichern. Noch ist nichts verloren: Die Einwilligung, die Sie bei {bank} erteilt haben, kann noch kurze Zeit gespeichert werden.",
				"Bitte laden Sie diese Seite gleich neu."},
			PageCrossSite: {"Bitte öffnen Sie den Einwilligungslink erneut",
				"Diese Einwilligung wurde von einer anderen Seite aus gestartet, nicht über die Schaltfläche der Einwilligungsseite. Zu Ihrer Sicherheit wurde nichts gestartet.",
				"Öffnen Sie den erhaltenen Einwilligungslink und klicken Sie auf die Schaltfläche. Geschieht das erneut, aktualisieren Sie Ihren Browser oder verwenden Sie einen anderen."},
			PageWrongBrowser: {"Bitte verwenden Sie denselben Browser",
				"Diese Einwilligung wurde in einem anderen Browser begonnen, oder dieser Browser hat sein Einwilligungs-Cookie nicht behalten. Zu Ihrer Sicherheit wurde sie hier nicht abgeschlossen.",
				"Öffnen Sie den erhaltenen Einwilligungslink in diesem Browser mit erlaubten Cookies oder fordern Sie einen neuen an."},
			PageNotFound: {"Seite nicht gefunden",
				"Unter dieser Adresse gibt es keine Seite.",
				"Um einzuwilligen, öffnen Sie den Einwilligungslink, den Sie erhalten haben."},
			PageGone: {"Diese Seite ist nicht mehr verfügbar",
				"Das Ergebnis einer Einwilligung wird hier nur für begrenzte Zeit angezeigt.",
				"Wenn Sie noch einwilligen müssen, fordern Sie einen neuen Einwilligungslink an."},
			PageResultUnavailable: {"Das Ergebnis kann gerade nicht angezeigt werden",
				"Dieser Dienst kann gerade nicht auf seinen Speicher zugreifen und daher das Ergebnis Ihrer Einwilligung nicht anzeigen.",
				"Bitte laden Sie diese Seite gleich neu."},
		},
	},
	"fr": {
		partner:   "le service qui vous a envoyé le lien",
		bank:      "votre banque",
		about:     "Consentement pour {merchant} auprès de {bank}",
		nextLabel: "Et maintenant ?",
		codeLabel: "Référence :",
		consent:   "Consentement",
		footer:    "Vous vous connectez sur le site de votre banque : ce service ne voit jamais votre mot de passe.",
		action:    "Continuer vers {bank}",
		pages: map[string]pageText{
			PageStart: {"Donnez votre consentement",
				"{partner} demande votre consentement pour accéder à votre compte auprès de {bank}. Vous vous connectez et décidez sur le site de {bank}.",
				"Appuyez sur le bouton pour continuer vers {bank}. Le lien n'est valable que peu de temps, jusqu'à ce que vous ayez donné votre consentement."},
			PageSuccess: {"Consentement donné",
				"Merci : votre consentement est enregistré. L'accès que vous avez accordé auprès de {bank} est maintenant disponible.",
				"Vous n'avez plus rien à faire : vous pouvez fermer cette fenêtre."},
			PageDenied: {"Consentement non donné",
				"Le consentement n'a pas été donné auprès de {bank} ; rien n'a été partagé.",
				"Si vous souhaitez finalement donner votre consentement, rouvrez bientôt le lien de consentement ou demandez-en un nouveau."},
			PageExpired: {"Ce lien de consentement a expiré",
				"Pour votre sécurité, un lien de consentement et le temps pour terminer auprès de la banque sont courts ; ce délai est dépassé. Rien n'a été enregistré.",
				"Demandez un nouveau lien de consentement et ouvrez-le peu après l'avoir reçu."},
			PageUsed: {"Ce lien de consentement a déjà servi",
				"Un lien de consentement ne sert qu'à un seul consentement, et celui-ci a déjà servi ou n'est pas connu ici.",
				"Si vous n'avez pas terminé votre consentement, demandez un nouveau lien de consentement."},
			PageMissing: {"Le lien de consentement est incomplet",
				"L'adresse ouverte ne contient pas de lien de consentement.",
				"Ouvrez le lien complet reçu (s'il est coupé sur deux lignes, copiez-le en entier) ou demandez-en un nouveau."},
			PageInvalid: {"Ce lien de consentement est abîmé",
				"Le lien de consentement dans l'adresse est illisible : une partie manque ou a été modifiée.",
				"Ouvrez le lien complet reçu (s'il est coupé sur deux lignes, copiez-le en entier) ou demandez-en un nouveau."},
			PageProviderError: {"La banque n'a pas pu traiter cette demande",
				"Cette demande de consentement n'a pas pu être traitée par {bank}. Il s'agit d'un problème de configuration du service, pas d'une décision de votre part ; son opérateur a été prévenu. Rien n'a été enregistré.",
				"Veuillez réessayer plus tard avec un nouveau lien de consentement."},
			PageFailed: {"Le consentement n'a pas pu aboutir",
				"Une erreur est survenue entre ce service et {bank} ; votre consentement n'a pas été enregistré.",
				"Veuillez demander un nouveau lien de consentement et réessayer."},
			PageUnavailable: {"Le service de consentement est indisponible",
				"Ce service ne peut joindre ni {bank} ni son stockage pour le moment ; votre consentement n'a pas été enregistré.",
				"Veuillez réessayer dans quelques minutes avec un nouveau lien de consentement."},
			PageRetryCallback: {"Votre banque est injoignable pour le moment",
				"Ce service ne peut pas joindre {bank} pour le moment afin d'enregistrer votre consentement. Rien n'est encore perdu : le consentement que vous avez donné auprès de {bank} peut encore être enregistré pendant un court moment.",
				"Veuillez recharger cette page dans un instant."},
			PageCrossSite: {"Veuillez rouvrir le lien de consentement",
				"Ce consentement a été lancé depuis un autre site, et non depuis le bouton de la page de consentement. Pour votre sécurité, rien n'a été lancé.",
				"Ouvrez le lien de consentement reçu et appuyez sur son bouton. Si cela se reproduit, mettez à jour votre navigateur ou utilisez-en un autre."},
			PageWrongBrowser: {"Veuillez utiliser le navigateur de départ",
				"Ce consentement a été commencé dans un autre navigateur, ou ce navigateur n'a pas gardé son cookie de consentement. Pour votre sécurité, il n'a pas été terminé ici.",
				"Ouvrez le lien de consentement reçu dans ce navigateur, cookies autorisés, ou demandez-en un nouveau."},
			PageNotFound: {"Page introuvable",
				"Il n'y a pas de page à cette adresse.",
				"Pour donner votre consentement, ouvrez le lien de consentement reçu."},
			PageGone: {"Cette page n'est plus disponible",
				"Le résultat d'un consentement n'est affiché ici que pour une durée limitée.",
				"Si vous devez encore donner votre consentement, demandez un nouveau lien de consentement."},
			PageResultUnavailable: {"Le résultat ne peut pas être affiché pour le moment",
				"Ce service ne peut pas lire son stockage pour le moment et ne peut donc pas afficher le résultat de votre consentement.",
				"Veuillez recharger cette page dans un instant."},
		},
	},
}
