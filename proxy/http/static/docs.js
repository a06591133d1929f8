// Starts Swagger UI on /docs. It is a file, not an inline <script>, so the page's
// Content-Security-Policy can forbid inline scripts (script-src 'self').
(function () {
  "use strict";
  window.ui = SwaggerUIBundle({
    // Relative, so it resolves against the page: this proxy, even behind a path prefix.
    url: "openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    // The default validator sends the spec to validator.swagger.io; the CSP would block it.
    validatorUrl: "none",
    // Keep a typed-in API key in this tab's memory only, never in localStorage.
    persistAuthorization: false,
  });
})();
