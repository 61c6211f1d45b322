-- Run once by the postgres image on an empty data volume (docker-entrypoint-initdb.d).
-- One database and one login role per service: a service owns its tables (it creates them on
-- start) and cannot connect to another service's database. The passwords are for the local
-- compose stack only; docker-compose.yml passes the same ones in ORDERPIPE_*_DATABASE_URL.

CREATE ROLE orders    LOGIN PASSWORD 'orders';
CREATE ROLE inventory LOGIN PASSWORD 'inventory';
CREATE ROLE email     LOGIN PASSWORD 'email';
CREATE ROLE invoice   LOGIN PASSWORD 'invoice';
CREATE ROLE analytics LOGIN PASSWORD 'analytics';

CREATE DATABASE orders    OWNER orders;
CREATE DATABASE inventory OWNER inventory;
CREATE DATABASE email     OWNER email;
CREATE DATABASE invoice   OWNER invoice;
CREATE DATABASE analytics OWNER analytics;

REVOKE CONNECT ON DATABASE orders    FROM PUBLIC;
REVOKE CONNECT ON DATABASE inventory FROM PUBLIC;
REVOKE CONNECT ON DATABASE email     FROM PUBLIC;
REVOKE CONNECT ON DATABASE invoice   FROM PUBLIC;
REVOKE CONNECT ON DATABASE analytics FROM PUBLIC;
